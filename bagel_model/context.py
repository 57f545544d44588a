"""`Context`: an immutable interleaved history (text, images) with its KV cache, and its CFG companions.

A BAGEL session is one sequence of segments (text, ViT image, VAE image) whose keys and values every later
step attends to. Prefilling is the expensive part, so a context keeps the K/V of each segment and
appending creates a *new* context that shares every existing segment with its parent: the parent is never
modified, two branches of one parent never see each other's tokens, and a chain of appends holds each
segment once. The segments' K/V are joined (copied into a query's `KVCache`) only when a forward needs
them: once per append, once per generated image (not per denoising step), once per answer.

Classifier-free guidance needs two more histories, kept exactly as the official inferencer keeps them
(BAGEL_REFERENCE §5.3), so a chain of steps never re-prefills them:
- `uncond_text`: the conditional history as it was before the latest text prompt (after the latest image);
- `uncond_img`: every text, but no image.
Where two histories hold the same segments they share them, and appending the same text to both is
computed once.

RoPE positions: a text segment takes one per token, an image one for all its tokens (BAGEL_REFERENCE §4.3).

This module keeps histories and nothing else: the decoder inputs of each kind come from the model
(`BagelModel.text_query` and friends), and the decoding and sampling loops are `engine.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from PIL import Image

from .images import patchify, prepare_context_image, to_tensor
from .layers.decoder import KV
from .model import BagelModel, Query


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

    def kvs(self) -> tuple[KV, ...]:
        """Every segment's K/V in order (shared, never copied here: a query's cache joins them)."""
        return tuple(s.kv for s in self.segments)

    def then(self, segment: Segment, rope_advance: int) -> History:
        return History(self.segments + (segment,), self.rope + rope_advance)


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
        """`history` followed by `query`'s tokens as a new segment (one decoder pass)."""
        cache = self.model.net.new_cache(query.length, history.kvs())
        self.model.run([query], [history.rope], [cache])
        kv = cache.new_kv(self.model.net.kv_storage)
        return history.then(Segment(kv=kv, **segment_fields), advance)

    def _text(self, text: str, targets: tuple[str, ...]) -> dict[str, History]:
        if not isinstance(text, str) or not text.strip():
            raise ContextError("the text to append is empty")
        self.check_fits(len(self.model.tokenizer.segment(text)))
        query = self.model.text_query(text)
        done: dict[int, History] = {}  # histories that are one object are prefilled once
        for name in targets:
            hist = getattr(self, name)
            if id(hist) not in done:
                done[id(hist)] = self._extend(hist, query, query.length, kind="text", text=text)
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
    def append_image(
        self,
        image: Image.Image,
        vae: bool = True,
        vit: bool = True,
        latent: torch.Tensor | None = None,
        cond_only: bool = False,
    ) -> Context:
        """Append an image: its VAE part (for generation), then its ViT part (for understanding).

        The image is first resized by the VAE rule and the ViT sees that resized image, as officially. The
        text-unconditional history becomes the context with the image; the image-unconditional one is
        unchanged. `latent` (z, H/8, W/8), the image's latent in the model's space when it is known (a
        generated image, a LATENT from another node), is used as the VAE part instead of encoding `image`
        (its decode, at the resized size). `cond_only`: the image joins the conditional history only and
        the CFG histories stay as they are (reasoning protocols that keep their guidance fixed)."""
        if not (vae or vit):
            raise ContextError("append_image needs vae=True, vit=True or both")
        cfg = self.model.config
        vae_image, vit_image = prepare_context_image(
            image, cfg.inference.vae_limits, cfg.inference.vit_limits
        )
        size = (vae_image.height, vae_image.width)
        self.check_fits(int(vae) + int(vit))  # an image takes one RoPE position per part
        history = self.cond
        if vae:
            history = self._extend(
                history, self._vae_query(vae_image, latent), 1, kind="vae", image_size=size
            )
        if vit:
            pixels = to_tensor(vit_image)
            query = self.model.vit_query(pixels)
            history = self._extend(history, query, 1, kind="vit", image_size=tuple(pixels.shape[1:]))
        if cond_only:
            return replace(self, cond=history, image_size=size)
        return replace(self, cond=history, uncond_text=history, image_size=size)

    def _vae_query(self, image: Image.Image, latent: torch.Tensor | None) -> Query:
        """The clean VAE part of a context image (already resized): from `latent` when given, else encoded."""
        d, down = self.model.config.latent_downsample, self.model.config.vae.downsample
        if latent is None:
            tokens = self.model.encode_latent(to_tensor(image))
        elif tuple(latent.shape[1:]) != (image.height // down, image.width // down):
            raise ContextError(
                f"a latent of {latent.shape[2] * down}x{latent.shape[1] * down} pixels is outside this "
                f"model's image sizes (it would be resized to {image.width}x{image.height}); resize the "
                "image instead"
            )
        else:
            tokens = patchify(latent.float(), self.model.config.latent_patch_size)
        return self.model.latent_query(
            self.model.image_frame(image.height // d, image.width // d), tokens, 0.0
        )

    # -- inspection ------------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        return self.cond.tokens

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held by this context and its CFG companions (shared segments counted once)."""
        return sum(t.nbytes for t in self.tensors())

    @property
    def latest_image_drawable(self) -> bool:
        """Whether the latest image has its VAE part, what an edit or a sequence continues from: an image
        appended for understanding only (Understand, Think, `vit` mode) has just its ViT part, and an edit
        of it would sample without its pixels."""
        segments = self.cond.segments
        images = [i for i, s in enumerate(segments) if s.kind in ("vae", "vit")]
        if not images:
            return False
        last = images[-1]
        return segments[last].kind == "vae" or (last > 0 and segments[last - 1].kind == "vae")

    def require_drawable_image(self, what: str) -> None:
        """Refuse to continue from a latest image that has no VAE part (see `latest_image_drawable`)."""
        if self.image_size is not None and not self.latest_image_drawable:
            raise ContextError(
                f"the context's latest image was added for understanding only (Understand, Think, or Context "
                f"Add Images in vit mode), so {what} would not see its pixels: connect the image to the "
                f"{what}'s image input, or add it with Context Add Images in vae+vit mode"
            )

    def tensors(self) -> list[torch.Tensor]:
        """Every K/V tensor this context holds (shared segments once): what keeps it in memory."""
        seen = {}
        for hist in (self.cond, self.uncond_text, self.uncond_img):
            for s in hist.segments:
                seen[id(s)] = (s.kv.k, s.kv.v)
        return [t for pair in seen.values() for t in pair]

    def _comfy_cache_tensors(self) -> list[torch.Tensor]:
        """What ComfyUI's RAM-pressure output cache sizes an output by (it knows only tensors and this
        hook), so that a context kept from an earlier prompt counts for its K/V."""
        return self.tensors()

    def summary(self) -> str:
        kinds = [s.kind for s in self.cond.segments]
        counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("text", "vae", "vit") if k in kinds) or "empty"
        return f"{len(kinds)} segments ({counts}), {self.tokens} tokens, {self.nbytes / 2**20:.1f} MiB"

    def check_model(self, model: BagelModel) -> None:
        if model is not self.model:
            raise ContextError(
                "this context was built by another model; connect the same BAGEL model to every node "
                "of a chain (a BAGEL LoRA Loader's output is a different model from its input)"
            )

    @property
    def room(self) -> int:
        """RoPE positions left before the model's window is full."""
        return self.model.config.llm.max_position_embeddings - self.cond.rope

    def check_fits(self, new_positions: int) -> None:
        """Refuse to grow past the model's RoPE window (text takes a position per token, an image one)."""
        limit = self.model.config.llm.max_position_embeddings
        if self.cond.rope + new_positions > limit:
            raise ContextError(
                f"the context would reach position {self.cond.rope + new_positions}, past the model's window "
                f"of {limit}; start a new context or shorten the prompt"
            )
