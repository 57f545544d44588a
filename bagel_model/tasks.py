"""The five BAGEL tasks over a `Context`: understand, think, generate an image, edit, image sequences.

Each task takes a context (or starts one), does what the official `InterleaveInferencer` does with the
official per-task defaults, and returns its result with the extended context, so tasks chain. Progress
and interruption go through one optional `callback`: it is called after each decoded token or denoising
step, and an exception raised in it (ComfyUI's interrupt, for one) stops the task cleanly — a context is
only ever replaced, never half-written.

Thinking system prompts are the official strings, byte for byte (BAGEL_REFERENCE §5.4).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .context import Context, History, image_routing, latent_positions
from .images import from_tensor, patchify, unpatchify_latent
from .layers.decoder import KVWorkspace, Routing
from .model import BagelModel
from .sampling import (
    EDIT_SETTINGS,
    T2I_SETTINGS,
    FlowSettings,
    batch_cfg,
    cfg_active,
    combine_cfg,
    extrapolate_velocity,
    schedule,
)

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
    "process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here"
)

StepCallback = Callable[[int, int, object], None]
"""callback(step, total, payload): payload is the text so far (decoding) or the current latent tokens."""


@dataclass(frozen=True)
class TextSettings:
    """Decoding knobs; defaults are the official ones (greedy; temperature used only when sampling)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.3

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")


THINK_TEXT_SETTINGS = TextSettings(max_new_tokens=1024)


def _start(model: BagelModel, context: Context | None) -> Context:
    if context is None:
        return Context.empty(model)
    context.check_model(model)
    return context


def _check_prompt(prompt: str, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"the {what} is empty")
    return prompt


# -- text ------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_text(
    model: BagelModel,
    history: History,
    settings: TextSettings,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> str:
    """Decode after `history`, starting from `<|im_start|>`, until `<|im_end|>` or the token budget.

    The history is not modified: decoding writes into a private buffer sized once for the whole answer,
    so each token costs one decoder pass and no copy of the cache."""
    markers = model.tokenizer.markers
    past = history.kv()
    if past is None:
        raise ValueError("there is nothing to answer: the context is empty")
    n_past = past.length
    buf = KVWorkspace.around(past, settings.max_new_tokens)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = [markers.bos]
    for step in range(settings.max_new_tokens):
        token = torch.tensor([ids[-1]], device=model.device)
        positions = torch.tensor([history.rope + step], device=model.device)
        end = n_past + step + 1
        workspace = KVWorkspace(buf.k[:, :end], buf.v[:, :end], end - 1)
        hidden, _ = model.net(model.net.embed_text(token), positions, Routing(), workspace, causal=True)
        logits = model.net.logits(hidden[-1]).float()
        if settings.do_sample:
            probs = torch.softmax(logits / settings.temperature, dim=-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        else:
            next_id = int(logits.argmax())
        if next_id == markers.eos:
            break
        ids.append(next_id)
        if callback is not None:
            callback(step + 1, settings.max_new_tokens, model.tokenizer.decode(ids[1:]))
    # Decode as the official inferencer does: the whole run, then the text after <|im_start|>.
    text = model.tokenizer.decode(ids)
    return text.split("<|im_end|>")[0].split("<|im_start|>")[1]


def understand(
    model: BagelModel,
    question: str,
    image: Image.Image | None = None,
    context: Context | None = None,
    think: bool = False,
    settings: TextSettings = TextSettings(),
    seed: int = 0,
    callback: StepCallback | None = None,
) -> tuple[str, Context]:
    """Answer a question (about an image, or the context). The answer joins the returned context as text.

    Official order: [thinking system prompt], image (ViT only), question, then decoding."""
    ctx = _start(model, context)
    _check_prompt(question, "question")
    if think:
        ctx = ctx.append_system_prompt(VLM_THINK_SYSTEM_PROMPT)
    if image is not None:
        ctx = ctx.append_image(image, vae=False, vit=True)
    ctx = ctx.append_text(question)
    answer = generate_text(model, ctx.cond, settings, seed, callback)
    return answer, ctx.append_text(answer) if answer.strip() else ctx


def think(
    model: BagelModel,
    instruction: str,
    image: Image.Image | None = None,
    context: Context | None = None,
    mode: str = "generate",
    settings: TextSettings = THINK_TEXT_SETTINGS,
    seed: int = 0,
    callback: StepCallback | None = None,
) -> tuple[str, Context]:
    """Write a plan before acting. mode "generate": plan an image (then generate or edit from the returned
    context with no new prompt); mode "answer": reason to an answer. The thought joins the conditional
    history only, as in the official think mode."""
    if mode not in ("generate", "answer"):
        raise ValueError(f"think mode {mode!r} is unknown; choose 'generate' or 'answer'")
    ctx = _start(model, context)
    _check_prompt(instruction, "instruction")
    ctx = ctx.append_system_prompt(GEN_THINK_SYSTEM_PROMPT if mode == "generate" else VLM_THINK_SYSTEM_PROMPT)
    if image is not None:
        ctx = ctx.append_image(image, vae=mode == "generate", vit=True)
    ctx = ctx.append_text(instruction)
    thought = generate_text(model, ctx.cond, settings, seed, callback)
    if not thought.strip():
        return thought, ctx
    return thought, ctx.append_thought(thought)


# -- images ----------------------------------------------------------------------------------------


def check_size(model: BagelModel, height: int, width: int) -> None:
    stride, top = model.config.latent_downsample, model.config.max_image_side
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < stride or v % stride or v > top:
            raise ValueError(f"{name} {v} must be a multiple of {stride} between {stride} and {top}")


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
    """One history the query is run after: its K/V with room for the query, and its next position."""

    kv: KVWorkspace
    rope: int

    @staticmethod
    def of(model: BagelModel, history: History, n_query: int) -> _Branch:
        past = history.kv()
        if past is None:
            llm = model.config.llm
            shape = (llm.num_hidden_layers, n_query, llm.num_key_value_heads, llm.head_dim)
            return _Branch(KVWorkspace.empty(shape, model.dtype, model.device), history.rope)
        return _Branch(KVWorkspace.around(past, n_query), history.rope)


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
    """Run the Euler sampler; returns the final latent tokens (h*w, c) and the number of decoder passes.

    Each branch's K/V is joined once, into a buffer with room for the query, before the loop. A CFG
    branch whose history is the conditional one (image CFG in plain text-to-image) reuses the conditional
    velocity instead of recomputing it, and no CFG pass runs at steps outside `cfg_interval` or when its
    scale is <= 1. With `settings.step_cache = k > 1`, only every k-th step (and the first two) runs the
    network; the others extrapolate the velocity (an approximation: faster, not identical)."""
    cfg = model.config
    h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
    device = model.device
    pos_ids = latent_positions(model, h, w)
    markers = model.net.embed_text(
        torch.tensor(
            [model.tokenizer.markers.start_of_image, model.tokenizer.markers.end_of_image], device=device
        )
    )
    zero_offsets = torch.zeros(h * w + 2, dtype=torch.long, device=device)
    n_query = h * w + 2
    cond = _Branch.of(model, context.cond, n_query)
    text_branch = _Branch.of(model, context.uncond_text, n_query)
    same_img = context.uncond_img.segments == context.cond.segments
    img_branch = None if same_img else _Branch.of(model, context.uncond_img, n_query)
    routings: dict[int, Routing] = {}  # per number of branches in one forward

    def forward(branches: list[_Branch], embeds: torch.Tensor) -> list[torch.Tensor]:
        """One decoder pass of the query after each of `branches`, side by side: their velocities."""
        n = len(branches)
        if n not in routings:
            routings[n] = image_routing(h * w, device, copies=n)
        positions = torch.cat([zero_offsets + b.rope for b in branches])
        kv = branches[0].kv if n == 1 else tuple(b.kv for b in branches)
        hidden, _ = model.net(embeds.repeat(n, 1), positions, routings[n], kv, causal=False)
        return list(model.net.velocity(hidden.view(n, n_query, -1)[:, 1:-1]).float())

    def velocities(branches: list[_Branch], embeds: torch.Tensor) -> list[torch.Tensor]:
        if batch_cfg(settings, device, h * w):
            return forward(branches, embeds)
        return [v for b in branches for v in forward([b], embeds)]

    def guided_velocity(t: float, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The CFG-combined velocity at time t, and how many branch passes it took."""
        inner = model.net.embed_latents(x, torch.full((), t, device=device), pos_ids)
        embeds = torch.cat([markers[:1], inner.to(markers.dtype), markers[1:]])
        guided = cfg_active(t, settings.cfg_interval)
        text_scale = settings.cfg_text_scale if guided else 1.0
        img_scale = settings.cfg_img_scale if guided else 1.0
        branches = [cond]
        if text_scale > 1.0:
            branches.append(text_branch)
            if img_scale > 1.0 and img_branch is not None:
                branches.append(img_branch)
        v, *rest = velocities(branches, embeds)
        v_text = v_img = None
        if rest:
            v_text = rest[0]
            if img_scale > 1.0:
                v_img = rest[1] if img_branch is not None else v  # reused: its history is cond's
        return combine_cfg(
            v, v_text, v_img, text_scale, img_scale, settings.renorm_type, settings.renorm_min
        ), len(branches)

    times, steps = schedule(settings.num_steps, settings.timestep_shift)
    x = noise.to(device=device, dtype=torch.float32)
    passes = 0
    evaluated: list[tuple[float, torch.Tensor]] = []  # the last two (t, v) computed by the network
    for i, (t, dt) in enumerate(zip(times, steps, strict=True)):
        if settings.step_cache > 1 and len(evaluated) == 2 and i % settings.step_cache:
            v = extrapolate_velocity(t, *evaluated)
        else:
            v, n = guided_velocity(t, x)
            passes += n
            evaluated = [*evaluated[-1:], (t, v)]
        x = x - v * dt
        if callback is not None:
            callback(i + 1, len(times), x)
    return x, passes


@torch.no_grad()
def decode_latent(model: BagelModel, tokens: torch.Tensor, height: int, width: int) -> Image.Image:
    """Latent tokens (h*w, c) -> RGB image, with the official uint8 conversion (truncation)."""
    cfg = model.config
    h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
    latent = unpatchify_latent(tokens, h, w, cfg.latent_patch_size, cfg.latent_channels)
    weight = next(model.vae.parameters())
    pixels = model.vae.decode(latent.unsqueeze(0).to(weight.device, weight.dtype))[0]
    return from_tensor(pixels.float().cpu())


def _render(
    model: BagelModel,
    ctx: Context,
    height: int,
    width: int,
    settings: FlowSettings,
    seed: int | None,
    latents: torch.Tensor | None,
    callback: StepCallback | None,
    append_result: bool,
) -> tuple[Image.Image, Context]:
    """Generate at the end of `ctx`, then append the image (clean, VAE + ViT) so the next step sees it;
    with `append_result=False` return `ctx` as it was (one-shot use: encoding the result costs a VAE
    encode, a ViT pass and a prefill that nothing would read)."""
    check_size(model, height, width)
    ctx.check_fits(1)
    noise = initial_noise(model, height, width, seed, latents)
    tokens, _ = denoise(model, ctx, height, width, settings, noise, callback)
    image = decode_latent(model, tokens, height, width)
    return image, ctx.append_image(image) if append_result else ctx


def generate_image(
    model: BagelModel,
    prompt: str | None,
    context: Context | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = T2I_SETTINGS,
    seed: int | None = 0,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> tuple[Image.Image, Context]:
    """Text-to-image. `prompt` may be None to generate from a context that already holds the request
    (after `think`, say). Size defaults to the model's default output size. The returned context holds
    the image, unless `append_result` is False (then it ends with the prompt)."""
    ctx = _start(model, context)
    if prompt is not None and prompt.strip():
        ctx = ctx.append_text(prompt)
    elif not ctx.cond.segments:
        raise ValueError("the prompt is empty and there is no context to generate from")
    height = model.config.inference.default_height if height is None else height
    width = model.config.inference.default_width if width is None else width
    return _render(model, ctx, height, width, settings, seed, latents, callback, append_result)


def edit_image(
    model: BagelModel,
    image: Image.Image | None,
    instruction: str | None,
    context: Context | None = None,
    settings: FlowSettings = EDIT_SETTINGS,
    seed: int | None = 0,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    callback: StepCallback | None = None,
    append_result: bool = True,
) -> tuple[Image.Image, Context]:
    """Edit `image` (appended VAE + ViT) by `instruction`. With `image=None`, edit the latest image of the
    context (a multi-turn edit chain: earlier turns are not re-encoded). The output size defaults to the
    input's size after the official resize. `append_result` as in `generate_image`."""
    ctx = _start(model, context)
    if image is not None:
        ctx = ctx.append_image(image)
    elif ctx.image_size is None:
        raise ValueError("edit needs an image, or a context that holds one")
    if instruction is not None and instruction.strip():
        ctx = ctx.append_text(instruction)
    elif image is not None:
        raise ValueError("the edit instruction is empty")
    h, w = ctx.image_size
    height, width = (h if height is None else height), (w if width is None else width)
    return _render(model, ctx, height, width, settings, seed, latents, callback, append_result)


def generate_sequence(
    model: BagelModel,
    prompts: list[str],
    context: Context | None = None,
    image: Image.Image | None = None,
    height: int | None = None,
    width: int | None = None,
    settings: FlowSettings = EDIT_SETTINGS,
    seed: int | None = 0,
    callback: StepCallback | None = None,
) -> tuple[list[Image.Image], Context]:
    """Several images in a row, one per prompt: each is appended clean to the context before the next,
    so frame k conditions frame k+1 (multi-frame motion, world navigation). The seed advances per image."""
    if not prompts:
        raise ValueError("a sequence needs at least one prompt")
    ctx = _start(model, context)
    if image is not None:
        ctx = ctx.append_image(image)
    if ctx.image_size is None and (height is None or width is None):
        height = model.config.inference.default_height if height is None else height
        width = model.config.inference.default_width if width is None else width
    frames = []
    for k, prompt in enumerate(prompts):
        _check_prompt(prompt)
        ctx = ctx.append_text(prompt)
        h, w = (height, width) if height and width else ctx.image_size
        frame_seed = None if seed is None else seed + k
        frame, ctx = _render(model, ctx, h, w, settings, frame_seed, None, callback, append_result=True)
        frames.append(frame)
    return frames, ctx
