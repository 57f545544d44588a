"""The two inference loops over a context: decoding text, and sampling an image with CFG.

Both run queries after a history's K/V without ever writing into the context: each loop copies the
prefix once into a `KVCache` with room for its queries, then runs many passes against it (one per decoded
token, one per denoising step). The context stays as it was, so a loop stopped part way (ComfyUI's
interrupt raised in the callback) leaves nothing half-written.

Progress and interruption go through one optional `callback(step, total, payload)`, called after each
decoded token (payload: the text so far) or denoising step (payload: the current latent tokens).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .context import Context, ContextError, History
from .images import patchify
from .layers.decoder import KVCache
from .model import BagelModel
from .sampling import FlowSettings, batch_cfg, cfg_active, combine_cfg, euler

StepCallback = Callable[[int, int, object], None]
"""callback(step, total, payload): payload is the text so far (decoding) or the current latent tokens."""


# -- text ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSettings:
    """Decoding knobs; defaults are the official ones (greedy; temperature used only when sampling)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.3

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:  # also refuses NaN
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")


STOP_END, STOP_BUDGET, STOP_WINDOW = "end", "max_new_tokens", "window"


class Answer(str):
    """Decoded text that also says why decoding stopped: `stop` is STOP_END (the model closed its answer),
    STOP_BUDGET (max_new_tokens reached) or STOP_WINDOW (the model's position window is full: the answer
    was cut where it still fits the context). A `str`, so callers that only want the text need nothing."""

    stop: str

    def __new__(cls, text: str, stop: str) -> Answer:
        answer = super().__new__(cls, text)
        answer.stop = stop
        return answer


def answer_room(model: BagelModel, history: History) -> int:
    """How many tokens an answer after `history` may have and still join the context: its segment adds
    `<|im_start|>` and `<|im_end|>`, and must end inside the model's position window."""
    return model.config.llm.max_position_embeddings - history.rope - 2


@torch.no_grad()
def decode_text(
    model: BagelModel,
    history: History,
    settings: TextSettings,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> Answer:
    """Decode after `history`, starting from `<|im_start|>`, until `<|im_end|>`, the token budget, or the
    end of the model's position window, whichever comes first (`Answer.stop` says which).

    Each token costs one decoder pass against one cache sized for the whole answer, so no pass copies the
    history."""
    if not history.segments:
        raise ContextError("there is nothing to answer: the context is empty")
    room = answer_room(model, history)
    if room < 1:
        raise ContextError(
            f"the context already fills the model's window of {model.config.llm.max_position_embeddings} "
            "positions: there is no room for an answer; start a new context"
        )
    budget = min(settings.max_new_tokens, room)
    markers = model.tokenizer.markers
    cache = model.net.new_cache(budget, history.kvs())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids, stop = [markers.bos], None
    for step in range(budget):
        query = model.token_query(ids[-1])
        hidden = model.run(query, [history.rope + step], [cache.narrow(cache.n_past + step, 1)])
        logits = model.net.logits(hidden[-1]).float()
        if settings.do_sample:
            probs = torch.softmax(logits / settings.temperature, dim=-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        else:
            next_id = int(logits.argmax())
        if next_id == markers.eos:
            stop = STOP_END
            break
        ids.append(next_id)
        if callback is not None:
            callback(step + 1, budget, model.tokenizer.decode(ids[1:]))
    if stop is None:
        stop = STOP_BUDGET if budget == settings.max_new_tokens else STOP_WINDOW
    text = _text_of(model, ids)
    # The answer joins the context re-tokenized, as officially; text that re-tokenizes longer than it was
    # decoded (rare, odd token runs) is cut further so that it still fits the window.
    while len(model.tokenizer.segment(text)) > room + 2 and len(ids) > 1:
        ids.pop()
        text, stop = _text_of(model, ids), STOP_WINDOW
    return Answer(text, stop)


def _text_of(model: BagelModel, ids: list[int]) -> str:
    """Decode as the official inferencer does: the whole run, then the text after <|im_start|>."""
    return model.tokenizer.decode(ids).split("<|im_end|>")[0].split("<|im_start|>")[1]


# -- images ----------------------------------------------------------------------------------------


def initial_noise(
    model: BagelModel, height: int, width: int, seed: int | None, latents: torch.Tensor | None
) -> torch.Tensor:
    """Token-major noise (h*w, c) in float32. Drawn on the CPU as officially (`randn(h*w, c)`), so a seed
    gives the same image on any device; explicit `latents` (z, H/8, W/8) override the seed."""
    cfg = model.config
    h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
    if latents is not None:
        expected = (cfg.latent_channels, height // cfg.vae.downsample, width // cfg.vae.downsample)
        if tuple(latents.shape) != expected:
            raise ValueError(
                f"latents have shape {list(latents.shape)}, expected {list(expected)} for {height}x{width}"
            )
        return patchify(latents.float().cpu(), cfg.latent_patch_size)
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(h * w, cfg.patch_latent_dim, generator=generator)


@dataclass(frozen=True)
class _Branch:
    """One history the image query runs after: its K/V with room for the query, and its next position."""

    cache: KVCache
    rope: int


@torch.no_grad()
def denoise(
    model: BagelModel,
    context: Context,
    height: int,
    width: int,
    settings: FlowSettings,
    noise: torch.Tensor,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, int]:
    """Sample an image at the end of `context`: the final latent tokens (h*w, c) and the number of branch
    passes the network ran.

    Each CFG branch's history is copied once, into a cache with room for the image query, before the loop.
    A branch whose history is the conditional one (image CFG in plain text-to-image) reuses the
    conditional velocity instead of recomputing it, and no CFG pass runs at steps outside `cfg_interval`
    or when its scale is <= 1. A step's branches run as one forward when `batch_cfg` says so."""
    cfg = model.config
    frame = model.image_frame(height // cfg.latent_downsample, width // cfg.latent_downsample)

    def branch(history: History) -> _Branch:
        return _Branch(model.net.new_cache(frame.length, history.kvs()), history.rope)

    cond, text_branch = branch(context.cond), branch(context.uncond_text)
    same_img = context.uncond_img.segments == context.cond.segments
    img_branch = None if same_img else branch(context.uncond_img)
    batched = batch_cfg(settings, model.device, frame.h * frame.w)
    passes = 0

    def branch_velocities(branches: list[_Branch], t: float, x: torch.Tensor) -> list[torch.Tensor]:
        """The query at (t, x) after each branch: side by side in one forward, or one forward each."""
        query = model.latent_query(frame, x, t)
        groups = [branches] if batched else [[b] for b in branches]
        out = []
        for group in groups:
            hidden = model.run(query, [b.rope for b in group], [b.cache for b in group])
            out.extend(model.net.velocity(hidden.view(len(group), frame.length, -1)[:, 1:-1]).float())
        return out

    def guided_velocity(t: float, x: torch.Tensor) -> torch.Tensor:
        nonlocal passes
        guided = cfg_active(t, settings.cfg_interval)
        text_scale = settings.cfg_text_scale if guided else 1.0
        img_scale = settings.cfg_img_scale if guided else 1.0
        branches = [cond]
        if text_scale > 1.0:
            branches.append(text_branch)
            if img_scale > 1.0 and img_branch is not None:
                branches.append(img_branch)
        passes += len(branches)
        v, *rest = branch_velocities(branches, t, x)
        v_text = v_img = None
        if rest:
            v_text = rest[0]
            if img_scale > 1.0:
                v_img = rest[1] if img_branch is not None else v  # reused: its history is cond's
        return combine_cfg(v, v_text, v_img, text_scale, img_scale, settings.renorm_type, settings.renorm_min)

    x = euler(guided_velocity, noise.to(device=model.device, dtype=torch.float32), settings, callback)
    return x, passes


def sample_image(
    model: BagelModel,
    context: Context,
    height: int,
    width: int,
    settings: FlowSettings,
    seed: int | None,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> Image.Image:
    """Noise from `seed` (or explicit `latents`), the sampler at the end of `context`, then the decoded
    image."""
    noise = initial_noise(model, height, width, seed, latents)
    tokens, _ = denoise(model, context, height, width, settings, noise, callback)
    d = model.config.latent_downsample
    return model.decode_latent(tokens, height // d, width // d)
