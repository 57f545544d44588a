"""`Context`: an immutable interleaved history (text, images) with its KV cache, and its CFG companions.

A BAGEL session is one sequence of segments (text, ViT image, VAE image) whose keys and values every later
step attends to. Prefilling is the expensive part, so a context keeps the K/V of each segment and
appending creates a *new* context that shares every existing segment with its parent: the parent is never
modified, two branches of one parent never see each other's tokens, and a chain of appends holds each
segment once. The per-layer K/V are joined (one `torch.cat`) only when a forward needs them: once per
append, once per generated image (not per denoising step), once per answer.

Classifier-free guidance needs two more histories, kept exactly as the official inferencer keeps them
(BAGEL_REFERENCE §5.3), so a chain of steps never re-prefills them:
- `uncond_text`: the conditional history as it was before the latest text prompt (after the latest image);
- `uncond_img`: every text, but no image.
Where two histories hold the same segments they share them, and appending the same text to both is
computed once.

Token layout (BAGEL_REFERENCE §4.3, §5.2): a text segment is `<|im_start|> text <|im_end|>` at consecutive
RoPE positions; an image segment is `<|vision_start|> tokens <|vision_end|>` with every token at one
position, and the position advances by one after it. Markers use the understanding expert, VAE latent
tokens the generation expert.

This module knows nothing about sampling or decoding strategies: `tasks.py` drives those.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image

from .images import flattened_position_ids, patchify, prepare_context_image, to_tensor
from .layers.decoder import KV, Routing
from .model import BagelModel


class ContextError(ValueError):
    """A context was used with the wrong model, or an input cannot be appended."""


@dataclass(frozen=True, eq=False)
class Segment:
    """One prefilled segment: its kind, what it holds, and its K/V (layers, n, h_kv, d)."""

    kind: str  # "text" | "vit" | "vae"
    kv: KV
    text: str | None = None
    image_size: tuple[int, int] | None = None  # (H, W) as encoded

    @property
    def tokens(self) -> int:
        return self.kv.length

    @property
    def nbytes(self) -> int:
        return self.kv.k.nbytes + self.kv.v.nbytes


@dataclass(frozen=True)
class History:
    """An immutable run of segments and the RoPE position that comes next."""

    segments: tuple[Segment, ...] = ()
    rope: int = 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    def kv(self) -> KV | None:
        """The whole prefix's K/V as one tensor pair (a fresh join; the segments stay shared)."""
        if not self.segments:
            return None
        if len(self.segments) == 1:
            return self.segments[0].kv
        return KV(
            torch.cat([s.kv.k for s in self.segments], dim=1),
            torch.cat([s.kv.v for s in self.segments], dim=1),
        )

    def then(self, segment: Segment, rope_advance: int) -> History:
        return History(self.segments + (segment,), self.rope + rope_advance)


@dataclass(frozen=True)
class Query:
    """Decoder input for some new tokens: embeddings, RoPE positions, expert routing, mask kind."""

    embeds: torch.Tensor  # (n, D)
    offsets: torch.Tensor  # (n,) position offsets from the history's rope
    routing: Routing
    causal: bool


def run_query(model: BagelModel, history: History, query: Query):
    """One decoder pass of `query` placed after `history`: (final hidden states (n, D), the query's K/V)."""
    positions = query.offsets + history.rope
    return model.net(query.embeds, positions, query.routing, history.kv(), query.causal)


def _markers(model: BagelModel, inner: torch.Tensor) -> torch.Tensor:
    """Wrap inner image embeddings (n, D) in the vision markers -> (n + 2, D)."""
    m = model.tokenizer.markers
    ids = torch.tensor([m.start_of_image, m.end_of_image], device=model.device)
    start, end = model.net.embed_text(ids).split(1)
    return torch.cat([start, inner.to(start.dtype), end])


def image_routing(n_latents: int, device: torch.device, copies: int = 1) -> Routing:
    """Markers to the understanding expert, the n latent tokens between them to the generation expert;
    `copies` such image queries one after another (the CFG branches of a batched denoising step)."""
    is_gen = torch.tensor([False] + [True] * n_latents + [False], device=device)
    return Routing.from_mask(is_gen.repeat(copies))


def text_query(model: BagelModel, text: str) -> Query:
    ids = torch.tensor(model.tokenizer.segment(text), device=model.device)
    offsets = torch.arange(ids.numel(), device=model.device)
    return Query(model.net.embed_text(ids), offsets, Routing(), causal=True)


def latent_positions(model: BagelModel, h: int, w: int) -> torch.Tensor:
    return flattened_position_ids(h, w, model.config.max_latent_size).to(model.device)


def vae_query(model: BagelModel, latent_tokens: torch.Tensor, h: int, w: int) -> Query:
    """A clean context image: its latent patches (h*w, c) at flow time 0."""
    t = torch.zeros((), device=model.device)
    inner = model.net.embed_latents(latent_tokens, t, latent_positions(model, h, w))
    n = h * w + 2
    return Query(
        _markers(model, inner),
        torch.zeros(n, dtype=torch.long, device=model.device),
        image_routing(h * w, model.device),
        causal=False,
    )


def vit_query(model: BagelModel, pixels: torch.Tensor) -> Query:
    """A context image for understanding: pixels (3, H, W) in [-1, 1], H and W multiples of the patch."""
    p = model.config.vit.patch_size
    h, w = pixels.shape[1] // p, pixels.shape[2] // p
    patches = patchify(pixels, p).to(model.device)
    pos = flattened_position_ids(h, w, model.config.vit_max_num_patch_per_side).to(model.device)
    inner = model.net.embed_vit(patches, pos, [h * w])
    n = h * w + 2
    return Query(
        _markers(model, inner), torch.zeros(n, dtype=torch.long, device=model.device), Routing(), causal=False
    )


@torch.no_grad()
def encode_latent(model: BagelModel, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (3, H, W) in [-1, 1] -> latent patches (h*w, c) with h, w = H/16, W/16.

    The AE posterior *mean* is used, so the same image always encodes to the same context (the official
    inferencer samples the posterior, which makes every re-encoding of an image differ)."""
    vae = model.vae
    weight = next(vae.parameters())
    latent = vae.encode(pixels.unsqueeze(0).to(weight.device, weight.dtype))[0]
    return patchify(latent, model.config.latent_patch_size)


@dataclass(frozen=True, eq=False)
class Context:
    """The user-facing context: the conditional history plus its two CFG companions. Immutable."""

    model: BagelModel
    cond: History
    uncond_text: History
    uncond_img: History
    image_size: tuple[int, int] | None = None  # (H, W) of the latest context image, the edit output size

    @staticmethod
    def empty(model: BagelModel) -> Context:
        h = History()
        return Context(model, h, h, h)

    # -- appending -------------------------------------------------------------------------------

    @torch.no_grad()
    def _extend(self, history: History, query: Query, advance: int, **segment_fields) -> History:
        _, kv = run_query(self.model, history, query)
        return history.then(Segment(kv=kv, **segment_fields), advance)

    def _text(self, text: str, targets: tuple[str, ...]) -> dict[str, History]:
        if not isinstance(text, str) or not text.strip():
            raise ContextError("the text to append is empty")
        self.check_fits(len(self.model.tokenizer.segment(text)))
        query = text_query(self.model, text)
        done: dict[int, History] = {}  # histories that are one object are prefilled once
        for name in targets:
            hist = getattr(self, name)
            if id(hist) not in done:
                done[id(hist)] = self._extend(hist, query, query.embeds.shape[0], kind="text", text=text)
        return {name: done[id(getattr(self, name))] for name in targets}

    def append_text(self, text: str) -> Context:
        """A prompt or answer: the text-unconditional history becomes the context without it."""
        new = self._text(text, ("cond", "uncond_img"))
        return replace(self, cond=new["cond"], uncond_text=self.cond, uncond_img=new["uncond_img"])

    def append_system_prompt(self, text: str) -> Context:
        """The official thinking system prompt goes to the conditional and image-unconditional histories."""
        new = self._text(text, ("cond", "uncond_img"))
        return replace(self, cond=new["cond"], uncond_img=new["uncond_img"])

    def append_thought(self, text: str) -> Context:
        """A generated plan joins the conditional history only (as the official think mode does)."""
        return replace(self, cond=self._text(text, ("cond",))["cond"])

    @torch.no_grad()
    def append_image(self, image: Image.Image, vae: bool = True, vit: bool = True) -> Context:
        """Append an image: its VAE part (for generation), then its ViT part (for understanding).

        The image is first resized by the VAE rule and the ViT sees that resized image, as officially. The
        text-unconditional history becomes the context with the image; the image-unconditional one is
        unchanged."""
        if not (vae or vit):
            raise ContextError("append_image needs vae=True, vit=True or both")
        cfg = self.model.config
        vae_image, vit_image = prepare_context_image(
            image, cfg.inference.vae_limits, cfg.inference.vit_limits
        )
        history = self.cond
        size = (vae_image.height, vae_image.width)
        self.check_fits(int(vae) + int(vit))  # an image takes one RoPE position per part
        if vae:
            h, w = vae_image.height // cfg.latent_downsample, vae_image.width // cfg.latent_downsample
            latent = encode_latent(self.model, to_tensor(vae_image))
            query = vae_query(self.model, latent, h, w)
            history = self._extend(history, query, 1, kind="vae", image_size=size)
        if vit:
            pixels = to_tensor(vit_image)
            query = vit_query(self.model, pixels)
            history = self._extend(history, query, 1, kind="vit", image_size=tuple(pixels.shape[1:]))
        return replace(self, cond=history, uncond_text=history, image_size=size)

    # -- inspection ------------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        return self.cond.tokens

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held by this context and its CFG companions (shared segments counted once)."""
        seen = {}
        for hist in (self.cond, self.uncond_text, self.uncond_img):
            for s in hist.segments:
                seen[id(s)] = s.nbytes
        return sum(seen.values())

    def summary(self) -> str:
        kinds = [s.kind for s in self.cond.segments]
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("text", "vae", "vit") if k in kinds) or "empty"
        return f"{len(kinds)} segments ({counts}), {self.tokens} tokens, {self.nbytes / 2**20:.1f} MiB"

    def check_model(self, model: BagelModel) -> None:
        if model is not self.model:
            raise ContextError(
                "this context was built by another model; connect the same BAGEL model to every node "
                "of a chain"
            )

    def check_fits(self, new_positions: int) -> None:
        """Refuse to grow past the model's RoPE window (text takes a position per token, an image one)."""
        limit = self.model.config.llm.max_position_embeddings
        if self.cond.rope + new_positions > limit:
            raise ContextError(
                f"the context would reach position {self.cond.rope + new_positions}, past the model's window "
                f"of {limit}; start a new context or shorten the prompt"
            )
