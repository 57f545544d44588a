"""`Bagel`: the network of `ema.safetensors`, and `BagelModel`: everything a task needs to run it.

`Bagel` turns each kind of token into decoder input (text ids, ViT patches, VAE latents at a flow time),
runs the MoT decoder over a query against a KV prefix, and maps hidden states back out (next-token logits,
flow velocity). It knows nothing about prompts, contexts or images: those are `context.py` and `tasks.py`.

Shapes: n tokens, D hidden, c = 4 * z latent features per token (2x2 patch of z channels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import BagelConfig
from .layers.attention import Backend
from .layers.decoder import KV, KVWorkspace, LanguageModel, Routing, Workspaces
from .layers.embeddings import PositionTable, TimestepEmbedder
from .layers.vae import AutoEncoder
from .layers.vit import SiglipVisionModel
from .tokenizer import BagelTokenizer


class Connector(nn.Module):
    """ViT features -> decoder width (official `MLPconnector` with tanh-GELU)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.config = cfg
        d = cfg.llm.hidden_size
        self.language_model = LanguageModel(cfg.llm)
        self.time_embedder = TimestepEmbedder(d, cfg.timestep_freq_dim)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, d)
        self.llm2vae = nn.Linear(d, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionTable(cfg.max_latent_size, d)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, d)
        self.vit_pos_embed = PositionTable(cfg.vit_max_num_patch_per_side, d)
        self.attn_backend: Backend = "auto"  # a setting (chosen at load), not state

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(
        self,
        patches: torch.Tensor,
        position_ids: torch.Tensor,
        seq_lens: list[int],
        backend: Backend = "auto",
    ) -> torch.Tensor:
        """patches (n, 3*p*p) of one or more images -> (n, D)."""
        features = self.vit_model(patches.to(self.dtype), position_ids, seq_lens, attn_backend=backend)
        return self.connector(features) + self.vit_pos_embed(position_ids)

    def embed_latents(self, x: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x (n, c) latent patches at flow time t (scalar or (n,)) -> (n, D). Context images use t=0."""
        return self.vae2llm(x.to(self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(position_ids)

    def forward(
        self,
        embeds: torch.Tensor,  # (n, D)
        positions: torch.Tensor,  # (n,) rope ids
        routing: Routing,
        past: KV | KVWorkspace | Workspaces | None,
        causal: bool,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV | tuple[KV, ...]]:
        """A decoder pass of a query after the prefix `past`: final hidden states and the query's K/V."""
        return self.language_model.model(embeds, positions, routing, past, causal, self.attn_backend, mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted flow velocity (noise - data) for latent tokens' hidden states."""
        return self.llm2vae(hidden)


@dataclass
class BagelModel:
    """A loaded model: the network, its autoencoder, its tokenizer and where it came from.

    The AE is kept apart from `Bagel` because the official checkpoint stores it in its own file and runs it
    in float32 whatever the decoder's dtype."""

    net: Bagel
    vae: AutoEncoder
    tokenizer: BagelTokenizer
    config: BagelConfig
    source: Path

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype
