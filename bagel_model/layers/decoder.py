"""The Qwen2 Mixture-of-Transformers decoder: every layer holds two experts that share one attention.

Routing is hard and decided by the caller per token: text, image markers and ViT tokens use the
understanding weights (`q_proj`, `mlp`, ...); VAE latent tokens use the generation copies (`q_proj_moe_gen`,
`mlp_moe_gen`, ...). The K/V a token contributes are its own expert's, and one softmax spans all tokens.

The KV cache (`KVCache`) is a value passed in by the caller, never stored on a module: contexts branch in a
ComfyUI graph, so modules must stay stateless. Attribute names mirror the official checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LLMConfig
from .attention import Backend, attention
from .embeddings import apply_rope, rope_cos_sin
from .ops import TORCH, Ops


@dataclass(frozen=True)
class Routing:
    """Which query tokens go to which expert. `gen_idx is None` means every token is understanding."""

    und_idx: torch.Tensor | None = None  # (n_und,) long
    gen_idx: torch.Tensor | None = None  # (n_gen,) long

    @staticmethod
    def from_mask(is_gen: torch.Tensor) -> Routing:
        if not bool(is_gen.any()):
            return Routing()
        return Routing(und_idx=(~is_gen).nonzero().squeeze(1), gen_idx=is_gen.nonzero().squeeze(1))

    def repeat(self, copies: int, length: int) -> Routing:
        """The routing of `copies` queries of `length` tokens one after another (batched CFG branches);
        index arithmetic only, so no device sync."""
        if self.gen_idx is None or copies == 1:
            return self
        shifts = [j * length for j in range(copies)]
        return Routing(
            und_idx=torch.cat([self.und_idx + s for s in shifts]),
            gen_idx=torch.cat([self.gen_idx + s for s in shifts]),
        )

    def apply(self, und: Callable, gen: Callable, x: torch.Tensor) -> torch.Tensor:
        """Run `und` on the understanding tokens and `gen` on the generation tokens of x (n, ...)."""
        if self.gen_idx is None:
            return und(x)
        if self.und_idx.numel() == 0:
            return gen(x)
        a, b = und(x[self.und_idx]), gen(x[self.gen_idx])
        out = a.new_empty((x.shape[0], *a.shape[1:]))
        out[self.und_idx] = a
        out[self.gen_idx] = b
        return out


@dataclass(frozen=True)
class KV:
    """Keys (after k-norm and RoPE) and values of some tokens, for every layer: (layers, n, h_kv, d)."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[1]


@dataclass(frozen=True)
class KVCache:
    """What a decoder pass attends to: per layer, a prefix's keys and values followed by room for the
    query, `k[i]`, `v[i]` of shape (n_past + n_query, h_kv, d).

    A pass writes its query's K/V into the room in place and attends over the whole buffer, so a loop that
    runs many queries after one prefix (denoising steps, decoded tokens) copies the prefix once, not once
    per pass and layer. No history is a cache with `n_past = 0`; the CFG branches of a batched denoising
    step are several caches side by side, one per equal part of the query. Buffers are per layer (not one
    (layers, ...) tensor) so that training, which runs through the same path, never writes into a tensor
    that an earlier layer saved for its backward pass."""

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    n_past: int

    @staticmethod
    def allocate(
        prefix: Sequence[KV],
        n_query: int,
        shape: tuple[int, int],
        dtype: torch.dtype,
        devices: Sequence[torch.device],
    ) -> KVCache:
        """A fresh cache holding the segments of `prefix` in order, then `n_query` rows of room.

        `shape` is (h_kv, d); layer i's buffer lives on `devices[i]`, where that layer runs."""
        n_past = sum(p.length for p in prefix)
        ks, vs = [], []
        for i, device in enumerate(devices):
            k = torch.empty((n_past + n_query, *shape), dtype=dtype, device=device)
            v = torch.empty((n_past + n_query, *shape), dtype=dtype, device=device)
            start = 0
            for p in prefix:
                k[start : start + p.length], v[start : start + p.length] = p.k[i], p.v[i]
                start += p.length
            ks.append(k)
            vs.append(v)
        return KVCache(tuple(ks), tuple(vs), n_past)

    @property
    def n_query(self) -> int:
        return self.k[0].shape[0] - self.n_past

    def narrow(self, n_past: int, n_query: int) -> KVCache:
        """A view of the first `n_past + n_query` rows whose last `n_query` are the room: token decoding
        runs each step on a longer view of one buffer sized for the whole answer."""
        end = n_past + n_query
        return KVCache(tuple(k[:end] for k in self.k), tuple(v[:end] for v in self.v), n_past)

    def new_kv(self, home: torch.device | None = None) -> KV:
        """The query's K/V as written by the last pass, as one compact copy (a context segment) on `home`
        (default: the first layer's device)."""
        home = home or self.k[0].device
        return KV(
            torch.stack([k[self.n_past :].to(home) for k in self.k]),
            torch.stack([v[self.n_past :].to(home) for v in self.v]),
        )


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, ops: Ops = TORCH):
        super().__init__()
        self.gate_proj = ops.Linear(hidden, inner, bias=False)
        self.up_proj = ops.Linear(hidden, inner, bias=False)
        self.down_proj = ops.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: Ops = TORCH):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.rope_theta = cfg.rope_theta
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", ops.Linear(cfg.hidden_size, q_dim))
            setattr(self, f"k_proj{suffix}", ops.Linear(cfg.hidden_size, kv_dim))
            setattr(self, f"v_proj{suffix}", ops.Linear(cfg.hidden_size, kv_dim))
            setattr(self, f"o_proj{suffix}", ops.Linear(q_dim, cfg.hidden_size, bias=False))
            setattr(self, f"q_norm{suffix}", ops.RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", ops.RMSNorm(self.head_dim, cfg.rms_norm_eps))

    def _qkv(self, suffix: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """One expert's projections + QK-norm, packed as (n, heads + 2*kv_heads, d) for routing."""
        q_proj, k_proj, v_proj = (getattr(self, f"{n}_proj{suffix}") for n in "qkv")
        q_norm, k_norm = getattr(self, f"q_norm{suffix}"), getattr(self, f"k_norm{suffix}")

        def qkv(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            q = q_norm(q_proj(x).view(n, self.heads, self.head_dim))
            k = k_norm(k_proj(x).view(n, self.kv_heads, self.head_dim))
            v = v_proj(x).view(n, self.kv_heads, self.head_dim)
            return torch.cat([q, k, v], dim=1)

        return qkv

    def forward(
        self,
        x: torch.Tensor,  # (n, hidden): len(caches) equal parts, part j placed after cache j's prefix
        positions: torch.Tensor,  # (n,) rope ids
        routing: Routing,
        caches: Sequence[tuple[torch.Tensor, torch.Tensor]],  # this layer's (k, v) buffer of each cache
        causal: bool,
        backend: Backend,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Write each part's K/V into its cache's room and attend over that cache; returns (n, hidden)."""
        qkv = routing.apply(self._qkv(""), self._qkv("_moe_gen"), x)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n = x.shape[0] // len(caches)
        outs = []
        for j, (keys, values) in enumerate(caches):
            part = slice(j * n, (j + 1) * n)
            keys[-n:], values[-n:] = k[part], v[part]
            outs.append(attention(q[part], keys, values, causal=causal, backend=backend, mask=mask))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return routing.apply(self.o_proj, self.o_proj_moe_gen, out.reshape(x.shape[0], -1))


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, ops: Ops = TORCH):
        super().__init__()
        self.self_attn = MoTAttention(cfg, ops)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, ops)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size, ops)
        self.input_layernorm = ops.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = ops.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ops.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = ops.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, routing: Routing, caches, causal: bool, backend: Backend, mask=None):
        h = routing.apply(self.input_layernorm, self.input_layernorm_moe_gen, x)
        x = x + self.self_attn(h, positions, routing, caches, causal, backend, mask)
        h = routing.apply(
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
            x,
        )
        return x + h


class MoTDecoder(nn.Module):
    """`language_model.model` of the checkpoint: embeddings, layers, and the two final norms."""

    def __init__(self, cfg: LLMConfig, ops: Ops = TORCH):
        super().__init__()
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg, ops) for _ in range(cfg.num_hidden_layers))
        self.norm = ops.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = ops.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Training: keep only each layer's input for the backward pass and run the layer again there
        # (memory of one layer's activations instead of all of them, for a second forward's time).
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,  # (n, hidden) input embeddings
        positions: torch.Tensor,
        routing: Routing,
        caches: Sequence[KVCache],
        causal: bool,
        backend: Backend = "auto",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run all layers over a query of len(caches) equal parts, part j after cache j's prefix; returns
        the final-norm hidden states. The parts' K/V are left in the caches' room (`KVCache.new_kv`).

        `mask` (n, n_past + n) bool overrides `causal` (see `attention`)."""
        if x.shape[0] % len(caches) or any(c.n_query != x.shape[0] // len(caches) for c in caches):
            raise ValueError(
                f"a query of {x.shape[0]} tokens does not fill caches with room for "
                f"{[c.n_query for c in caches]}"
            )
        if mask is not None and len(caches) > 1:
            raise ValueError("a mask applies to one query; run masked queries one at a time")
        for i, layer in enumerate(self.layers):
            kv = [(c.k[i], c.v[i]) for c in caches]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, positions, routing, kv, causal, backend, mask, use_reentrant=False)
            else:
                x = layer(x, positions, routing, kv, causal, backend, mask)
        return routing.apply(self.norm, self.norm_moe_gen, x)


class LanguageModel(nn.Module):
    """`language_model` of the checkpoint: the decoder plus an untied `lm_head`."""

    def __init__(self, cfg: LLMConfig, ops: Ops = TORCH):
        super().__init__()
        self.model = MoTDecoder(cfg, ops)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
