"""`Bagel`: the network of `ema.safetensors`, and `BagelModel`: everything a task needs to run it.

`Bagel` turns each kind of token into decoder input (text ids, ViT patches, VAE latents at a flow time),
runs the MoT decoder over a query against KV caches, and maps hidden states back out (next-token logits,
flow velocity). `BagelModel` adds the tokenizer and the autoencoder and builds whole decoder inputs
(`Query`: a text segment, a ViT image, a VAE image at a flow time, each in BAGEL's token layout), the one
place both appending to a context and the sampling loops get them from. Neither knows about contexts or
tasks: those are `context.py`, `engine.py` and `tasks.py`.

Token layout (BAGEL_REFERENCE §4.3, §5.2): a text segment is `<|im_start|> text <|im_end|>` at consecutive
RoPE positions; an image is `<|vision_start|> tokens <|vision_end|>` with every token at one position.
Markers use the understanding expert, VAE latent tokens the generation expert.

Shapes: n tokens, D hidden, c = 4 * z latent features per token (2x2 patch of z channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import BagelConfig
from .images import flattened_position_ids, from_tensor, patchify
from .layers.attention import Backend
from .layers.decoder import KV, KVCache, LanguageModel, Routing
from .layers.embeddings import PositionTable, TimestepEmbedder
from .layers.ops import TORCH, Ops
from .layers.vae import AutoEncoder
from .layers.vit import SiglipVisionModel
from .tokenizer import BagelTokenizer


class Connector(nn.Module):
    """ViT features -> decoder width (official `MLPconnector` with tanh-GELU)."""

    def __init__(self, in_dim: int, out_dim: int, ops: Ops = TORCH):
        super().__init__()
        self.fc1 = ops.Linear(in_dim, out_dim)
        self.fc2 = ops.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig, ops: Ops = TORCH):
        super().__init__()
        self.config = cfg
        d = cfg.llm.hidden_size
        self.language_model = LanguageModel(cfg.llm, ops)
        self.time_embedder = TimestepEmbedder(d, cfg.timestep_freq_dim, ops)
        self.vae2llm = ops.Linear(cfg.patch_latent_dim, d)
        self.llm2vae = ops.Linear(d, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionTable(cfg.max_latent_size, d)
        self.vit_model = SiglipVisionModel(cfg.vit, ops)
        self.connector = Connector(cfg.vit.hidden_size, d, ops)
        self.vit_pos_embed = PositionTable(cfg.vit_max_num_patch_per_side, d)
        self.attn_backend: Backend = "auto"  # a setting (chosen at load), not state
        # Set by `place` when accelerate spreads or offloads the weights (offload.py); else None: the
        # weights' own device.
        self._execution: torch.device | None = None
        self._layer_devices: list[torch.device] | None = None
        self.kv_storage: torch.device | None = None  # where context segments keep their K/V; see `place`

    def place(
        self,
        execution: torch.device,
        layer_devices: list[torch.device] | None = None,
        kv_storage: torch.device | None = None,
    ) -> None:
        """Record where inputs are made and where each decoder layer runs (its K/V cache lives there;
        None: all at `execution`), for weights that a memory manager keeps elsewhere between forwards.
        `kv_storage` is where contexts keep their segments' K/V between tasks (None: where they were
        computed): a memory manager's offload device, so that a context held by an output cache holds no
        compute-device memory; a task joins them into its cache on the compute device (one copy per
        task, not per step)."""
        self._execution, self._layer_devices = execution, layer_devices
        self.kv_storage = kv_storage

    @property
    def device(self) -> torch.device:
        return self._execution or self.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(
        self, patches: torch.Tensor, position_ids: torch.Tensor, seq_lens: list[int]
    ) -> torch.Tensor:
        """patches (n, 3*p*p) of one or more images -> (n, D), with the attention backend chosen at load."""
        features = self.vit_model(
            patches.to(self.dtype), position_ids, seq_lens, attn_backend=self.attn_backend
        )
        return self.connector(features) + self.vit_pos_embed(position_ids)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x (n, c) latent patches at flow time t (scalar or (n,)) -> (n, D). Context images use t=0."""
        return self.vae2llm(x.to(self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    def forward(
        self,
        embeds: torch.Tensor,  # (n, D)
        positions: torch.Tensor,  # (n,) rope ids
        routing: Routing,
        caches: Sequence[KVCache] | None,
        causal: bool,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A decoder pass of a query after each cache's prefix (see `MoTDecoder.forward`): final hidden
        states. `caches=None`: the query alone (no history; training), with its K/V discarded."""
        if caches is None:
            caches = [self.new_cache(embeds.shape[0])]
        return self.language_model.model(embeds, positions, routing, caches, causal, self.attn_backend, mask)

    def new_cache(self, n_query: int, prefix: Sequence[KV] = ()) -> KVCache:
        """A cache holding `prefix` (segments in order) with room for `n_query` tokens."""
        llm = self.config.llm
        devices = self._layer_devices or [self.device] * llm.num_hidden_layers
        return KVCache.allocate(prefix, n_query, (llm.num_key_value_heads, llm.head_dim), self.dtype, devices)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted flow velocity (noise - data) for latent tokens' hidden states."""
        return self.llm2vae(hidden)


@dataclass(frozen=True)
class Query:
    """Decoder input for some new tokens: embeddings, RoPE offsets from the history's next position,
    expert routing, and whether the tokens attend causally among themselves (text) or fully (images)."""

    embeds: torch.Tensor  # (n, D)
    offsets: torch.Tensor  # (n,)
    routing: Routing
    causal: bool

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


@dataclass(frozen=True)
class ImageFrame:
    """What every VAE-image query of one latent grid shares, built once per grid: denoising makes one
    query per step from it, appending a clean image one."""

    h: int
    w: int
    positions: torch.Tensor  # (h*w,) into the latent position table
    markers: torch.Tensor  # (2, D) <|vision_start|>, <|vision_end|> embeddings
    routing: Routing  # markers -> understanding expert, latents -> generation expert

    @property
    def length(self) -> int:
        return self.h * self.w + 2


class BagelModel(nn.Module):
    """A loaded model: the network, its autoencoder, its tokenizer and where it came from.

    One module holding every weight, so a memory manager (ComfyUI's ModelPatcher) can hold, move and free
    it as it is. The AE is kept apart from `Bagel` because the official checkpoint stores it in its own
    file and runs it in float32 whatever the decoder's dtype."""

    def __init__(
        self, net: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, config: BagelConfig, source: Path
    ):
        super().__init__()
        self.net = net
        self.vae = vae
        self.tokenizer = tokenizer
        self.config = config
        self.source = source

    def __repr__(self) -> str:
        return f"BagelModel({self.source}, {self.device}, {self.dtype})"

    @property
    def device(self) -> torch.device:
        """Where inputs are made: the decoder's execution device."""
        return self.net.device

    def place(self, execution: torch.device, kv_storage: torch.device | None = None) -> None:
        """Run everything on `execution`, wherever a memory manager keeps the weights between forwards
        (ComfyUI's partial loading leaves some on the CPU and brings each in for its forward); contexts
        keep their K/V on `kv_storage` between tasks (`Bagel.place`)."""
        self.net.place(execution, kv_storage=kv_storage)
        self.vae.place(execution)

    @device.setter
    def device(self, _: torch.device) -> None:
        """Ignored: the weights say where the model is. ComfyUI's ModelPatcher records each move by
        assigning `device`, which must not fail."""

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    # -- decoder inputs ------------------------------------------------------------------------------

    def _markers(self) -> torch.Tensor:
        m = self.tokenizer.markers
        return self.net.embed_text(torch.tensor([m.start_of_image, m.end_of_image], device=self.device))

    def _image(self, inner: torch.Tensor, markers: torch.Tensor, routing: Routing) -> Query:
        """Inner image embeddings (n, D) wrapped in the vision markers, every token at one position."""
        embeds = torch.cat([markers[:1], inner.to(markers.dtype), markers[1:]])
        offsets = torch.zeros(embeds.shape[0], dtype=torch.long, device=self.device)
        return Query(embeds, offsets, routing, causal=False)

    def text_query(self, text: str) -> Query:
        ids = torch.tensor(self.tokenizer.segment(text), device=self.device)
        offsets = torch.arange(ids.numel(), device=self.device)
        return Query(self.net.embed_text(ids), offsets, Routing(), causal=True)

    def token_query(self, token: int) -> Query:
        """One decoded token (it attends to everything before it)."""
        ids = torch.tensor([token], device=self.device)
        return Query(
            self.net.embed_text(ids), torch.zeros(1, dtype=torch.long, device=self.device), Routing(), True
        )

    def image_frame(self, h: int, w: int) -> ImageFrame:
        """The shared parts of an image query on an h x w latent-token grid."""
        positions = flattened_position_ids(h, w, self.config.max_latent_size).to(self.device)
        is_gen = torch.tensor([False] + [True] * (h * w) + [False], device=self.device)
        return ImageFrame(h, w, positions, self._markers(), Routing.from_mask(is_gen))

    def latent_query(self, frame: ImageFrame, tokens: torch.Tensor, t: float) -> Query:
        """A VAE image: latent patches (h*w, c) at flow time t (0 for a clean context image)."""
        time = torch.full((), t, dtype=torch.float32, device=self.device)
        inner = self.net.embed_latents(tokens.to(self.device), time, frame.positions)
        return self._image(inner, frame.markers, frame.routing)

    def vit_query(self, pixels: torch.Tensor) -> Query:
        """An image for understanding: pixels (3, H, W) in [-1, 1], H and W multiples of the patch."""
        p = self.config.vit.patch_size
        h, w = pixels.shape[1] // p, pixels.shape[2] // p
        patches = patchify(pixels, p).to(self.device)
        positions = flattened_position_ids(h, w, self.config.vit_max_num_patch_per_side).to(self.device)
        return self._image(self.net.embed_vit(patches, positions, [h * w]), self._markers(), Routing())

    def run(self, queries: Sequence[Query], ropes: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
        """One decoder pass of several queries side by side, query j after cache j's prefix from that
        history's next RoPE position ropes[j]: hidden states (len(queries) * n, D). The queries' K/V land in
        the caches' room. Side-by-side queries share one token layout (the same length and routing: the CFG
        branches of a denoising step, or the images of a batch)."""
        first = queries[0]
        if any(q.length != first.length or q.causal != first.causal for q in queries):
            raise ValueError("queries run side by side must share one token layout")
        n = len(queries)
        embeds = first.embeds if n == 1 else torch.cat([q.embeds for q in queries])
        positions = torch.cat([q.offsets + r for q, r in zip(queries, ropes, strict=True)])
        return self.net(embeds, positions, first.routing.repeat(n, first.length), caches, first.causal)

    # -- the autoencoder -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latent(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (3, H, W) in [-1, 1] -> latent patches (h*w, c) with h, w = H/16, W/16.

        The AE posterior *mean* is used, so the same image always encodes to the same context (the official
        inferencer samples the posterior, which makes every re-encoding of an image differ)."""
        latent = self.vae.encode(pixels.unsqueeze(0).to(self.vae.device, self.vae.dtype))[0]
        return patchify(latent, self.config.latent_patch_size)

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor):
        """A latent (z, H/8, W/8) in the model's scaled latent space -> RGB image, with the official uint8
        conversion (truncation)."""
        pixels = self.vae.decode(latent.unsqueeze(0).to(self.vae.device, self.vae.dtype))[0]
        return from_tensor(pixels.float().cpu())
