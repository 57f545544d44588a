"""The two inference loops over a context: decoding text, and sampling an image with CFG.

Both run queries after a history's K/V without ever writing into the context: each loop copies the
prefix once into a `KVCache` with room for its queries, then runs many passes against it (one per decoded
token, one per denoising step). The context stays as it was, so a loop stopped part way (ComfyUI's
interrupt raised in the callback) leaves nothing half-written.

Progress and interruption go through one optional `callback(step, total, payload)`, called after each
decoded token (payload: the text so far, a prefix of the answer, so a caller can stream it) or denoising
step (payload: the step's estimate of the clean latents (B, z, H/8, W/8), in the model's scaled space: what
a preview shows).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .context import Context, ContextError, History
from .images import patchify, unpatchify_latent
from .layers.decoder import KVCache
from .model import BagelModel, ImageFrame
from .sampling import FlowSettings, batch_cfg, cfg_active, check_finite, combine_cfg, euler, schedule

StepCallback = Callable[[int, int, object], None]
"""callback(step, total, payload): the text so far (a `str`: decoding) or the clean-latent estimate (a
tensor: sampling)."""


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
        if self.do_sample:
            check_finite("temperature", self.temperature)
            if self.temperature <= 0:
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

    def __reduce__(self) -> tuple:
        """Copy and pickle with the stop reason (ComfyUI deep-copies node outputs into its history)."""
        return Answer, (str(self), self.stop)


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
    history. The callback's text grows by prefixes and its last one is the answer (read off the ids as the
    answer is), except where the answer is cut at the end to fit the window (STOP_WINDOW): a token that
    ends inside a character shows once the character is whole (so an answer that ends in a broken one
    shows without it)."""
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
    so_far = TextSoFar(model) if callback is not None else None
    for step in range(budget):
        query = model.token_query(ids[-1])
        hidden = model.run([query], [history.rope + step], [cache.narrow(cache.n_past + step, 1)])
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
            callback(step + 1, budget, so_far.add(next_id))
    if stop is None:
        stop = STOP_BUDGET if budget == settings.max_new_tokens else STOP_WINDOW
    text = _text_of(model, ids)
    # The answer joins the context re-tokenized, as officially; text that re-tokenizes longer than it was
    # decoded (rare, odd token runs) is cut further so that it still fits the window.
    while len(model.tokenizer.segment(text)) > room + 2 and len(ids) > 1:
        ids.pop()
        text, stop = _text_of(model, ids), STOP_WINDOW
    return Answer(text, stop)


PARTIAL_CHARACTER = "\ufffd"  # what byte-level decoding shows for the first bytes of a multi-byte character


def _text_of(model: BagelModel, ids: list[int]) -> str:
    """Decode as the official inferencer does: the whole run, then the text after <|im_start|>."""
    return model.tokenizer.decode(ids).split("<|im_end|>")[0].split("<|im_start|>")[1]


class TextSoFar:
    """The callback's text as decoding appends ids after <|im_start|>: `_text_of` of the run so far, without
    a partial character at its end, decoding only the ids that came since the text last ended whole
    (decoding the whole run at every token costs O(n²) over an answer: 0.16 ms a token at 2000 tokens).
    Byte-level pieces decode to the same text apart as together wherever the text before ends whole."""

    def __init__(self, model: BagelModel):
        self._decode = model.tokenizer.decode
        self._whole = ""  # the decoded ids, up to the last one that ended a character
        self._pending: list[int] = []  # ids after those

    def add(self, token_id: int) -> str:
        """Take the next id; the text so far."""
        self._pending.append(token_id)
        tail = self._decode(self._pending)
        if not tail.endswith(PARTIAL_CHARACTER):
            self._whole, self._pending, tail = self._whole + tail, [], ""
        text = self._whole + tail
        return text.split("<|im_end|>")[0].split("<|im_start|>")[0].rstrip(PARTIAL_CHARACTER)


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
    """One history an image query runs after: its K/V with room for the query, and its next position."""

    cache: KVCache
    rope: int


@dataclass(frozen=True)
class _Guidance:
    """The CFG branches of one image. `img is None`: the image-unconditional history is the conditional
    one (plain text-to-image), so its velocity is the conditional one, reused."""

    cond: _Branch
    text: _Branch
    img: _Branch | None

    def active(self, text_scale: float, img_scale: float) -> list[_Branch]:
        """The branches a step runs: no CFG pass when its scale is <= 1 (image CFG needs text CFG)."""
        if text_scale <= 1.0:
            return [self.cond]
        if img_scale <= 1.0 or self.img is None:
            return [self.cond, self.text]
        return [self.cond, self.text, self.img]

    def combine(
        self, velocities: list[torch.Tensor], text_scale: float, img_scale: float, settings: FlowSettings
    ) -> torch.Tensor:
        """The guided velocity from the active branches' velocities, in `active`'s order."""
        v, *rest = velocities
        v_text = rest[0] if rest else None
        v_img = None
        if rest and img_scale > 1.0:
            v_img = rest[1] if self.img is not None else v  # reused: its history is cond's
        return combine_cfg(v, v_text, v_img, text_scale, img_scale, settings.renorm_type, settings.renorm_min)


@dataclass(frozen=True)
class GuidedVelocity:
    """The guided velocity of B images, each at the end of its own context: what `euler` integrates.

    Built once before the loop (`guided_velocity`): each CFG branch's history copied into a cache with room
    for the image query. A call runs one step's passes, every image's active branches, as one forward when
    `batched`, else one forward each, and combines each image's velocities by its CFG."""

    model: BagelModel
    frame: ImageFrame
    guidance: list[_Guidance]
    settings: FlowSettings
    batched: bool

    def __call__(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """The guided velocity (B, h*w, c) of latent tokens `x` (B, h*w, c) at flow time t."""
        model, frame, settings = self.model, self.frame, self.settings
        guided = cfg_active(t, settings.cfg_interval)
        text_scale = settings.cfg_text_scale if guided else 1.0
        img_scale = settings.cfg_img_scale if guided else 1.0
        active = [g.active(text_scale, img_scale) for g in self.guidance]
        queries = [model.latent_query(frame, tokens, t) for tokens in x]
        parts = [(queries[b], br) for b, branches in enumerate(active) for br in branches]
        velocities = []
        for group in [parts] if self.batched else [[p] for p in parts]:
            qs, brs = zip(*group, strict=True)
            hidden = model.run(qs, [br.rope for br in brs], [br.cache for br in brs])
            velocities.extend(model.net.velocity(hidden.view(len(group), frame.length, -1)[:, 1:-1]).float())
        out, k = [], 0
        for g, branches in zip(self.guidance, active, strict=True):
            out.append(g.combine(velocities[k : k + len(branches)], text_scale, img_scale, settings))
            k += len(branches)
        return torch.stack(out)


def guided_velocity(
    model: BagelModel, contexts: Sequence[Context], height: int, width: int, settings: FlowSettings
) -> GuidedVelocity:
    """The sampler's setup: one branch per CFG history of each context, sized for a height x width image.

    A branch whose history is the conditional one (image CFG in plain text-to-image) is not built: its
    velocity is the conditional one, reused. No CFG pass runs at steps outside `cfg_interval` or when its
    scale is <= 1 (`_Guidance.active`)."""
    cfg = model.config
    frame = model.image_frame(height // cfg.latent_downsample, width // cfg.latent_downsample)

    def branch(history: History) -> _Branch:
        return _Branch(model.net.new_cache(frame.length, history.kvs()), history.rope)

    guidance = [
        _Guidance(
            branch(c.cond),
            branch(c.uncond_text),
            None if c.uncond_img.segments == c.cond.segments else branch(c.uncond_img),
        )
        for c in contexts
    ]
    batched = batch_cfg(settings, model.device, frame.h * frame.w * len(contexts))
    return GuidedVelocity(model, frame, guidance, settings, batched)


@torch.no_grad()
def denoise(
    model: BagelModel,
    contexts: Sequence[Context],
    height: int,
    width: int,
    settings: FlowSettings,
    noise: torch.Tensor,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Sample B images together, image b at the end of context b (one context repeated: a batch of seeds;
    one context per image: a batch of edits), from noise (B, h*w, c): their final latent tokens
    (B, h*w, c). The setup (`guided_velocity`) is built first; the loop is `sampling.euler`'s."""
    if noise.ndim != 3 or noise.shape[0] != len(contexts):
        raise ValueError(f"noise of shape {list(noise.shape)} for {len(contexts)} contexts, not (B, n, c)")
    velocity = guided_velocity(model, contexts, height, width, settings)
    h, w = velocity.frame.h, velocity.frame.w

    def report(step: int, total: int, x0: torch.Tensor) -> None:
        callback(step, total, latent_grids(model, x0, h, w))

    times, steps = schedule(settings.num_steps, settings.timestep_shift)
    x = noise.to(device=model.device, dtype=torch.float32)
    return euler(velocity, x, times, steps, settings.step_cache, None if callback is None else report)


def latent_grids(model: BagelModel, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Latent tokens (B, h*w, c) on an h x w grid -> the autoencoder's latents (B, z, 2h, 2w) in the model's
    scaled space (what its decoder, or a preview, reads)."""
    cfg = model.config
    return torch.stack(
        [unpatchify_latent(t, h, w, cfg.latent_patch_size, cfg.latent_channels) for t in tokens]
    )


@dataclass(frozen=True)
class ImageRequest:
    """What one batch of images is drawn with, handed as one value from a task to the sampler: the size,
    the sampler settings, and the start noise: item b's from seed + b (None: a random seed), or row b of
    explicit `latents` (B, z, H/8, W/8)."""

    height: int
    width: int
    settings: FlowSettings
    seed: int | None = 0
    latents: torch.Tensor | None = None

    def noise(self, model: BagelModel, batch: int) -> torch.Tensor:
        """The start noise (B, h*w, c) of a batch of `batch`: item b is what a batch of one gives with its
        seed or latents."""
        if self.latents is not None and self.latents.shape[0] != batch:
            raise ValueError(f"latents hold {self.latents.shape[0]} images for a batch of {batch}")
        explicit = [None] * batch if self.latents is None else list(self.latents)
        seeds = [None if self.seed is None else self.seed + b for b in range(batch)]
        return torch.stack(
            [
                initial_noise(model, self.height, self.width, s, z)
                for s, z in zip(seeds, explicit, strict=True)
            ]
        )


def sample_images(
    model: BagelModel,
    contexts: Sequence[Context],
    request: ImageRequest,
    callback: StepCallback | None = None,
) -> tuple[list[Image.Image], torch.Tensor]:
    """One image at the end of each context, sampled together: the decoded images and their latents
    (B, z, H/8, W/8) in the model's scaled latent space."""
    noise = request.noise(model, len(contexts))
    tokens = denoise(model, contexts, request.height, request.width, request.settings, noise, callback)
    d = model.config.latent_downsample
    grids = latent_grids(model, tokens, request.height // d, request.width // d)
    return [model.decode_latent(z) for z in grids], grids.cpu()
