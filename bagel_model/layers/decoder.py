"""The Qwen2 Mixture-of-Transformers decoder: every layer holds two experts that share one attention.

Routing is hard and decided by the caller per token: text, image markers and ViT tokens use the
understanding weights (`q_proj`, `mlp`, ...); VAE latent tokens use the generation copies (`q_proj_moe_gen`,
`mlp_moe_gen`, ...). The K/V a token contributes are its own expert's, and one softmax spans all tokens.

The KV cache is a value passed in and returned, never stored on a module: contexts branch in a ComfyUI
graph, so modules must stay stateless. Attribute names mirror the official checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .attention import Backend, attention
from .embeddings import apply_rope, rope_cos_sin


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
class KVWorkspace:
    """A prefix's K/V with room for the query at the tail: (layers, n_past + n_query, h_kv, d).

    A forward writes its query's K/V into the tail in place and attends over the whole buffer, so a loop
    that runs many queries after one prefix (denoising steps, decoded tokens) copies the prefix once, not
    once per pass and layer."""

    k: torch.Tensor
    v: torch.Tensor
    n_past: int

    @staticmethod
    def around(past: KV, n_query: int) -> KVWorkspace:
        """A fresh buffer holding `past` followed by `n_query` rows to be written."""
        layers, n_past, heads, dim = past.k.shape
        shape = (layers, n_past + n_query, heads, dim)
        k, v = past.k.new_empty(shape), past.v.new_empty(shape)
        k[:, :n_past], v[:, :n_past] = past.k, past.v
        return KVWorkspace(k, v, n_past)

    @staticmethod
    def empty(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> KVWorkspace:
        """A buffer (layers, n_query, h_kv, d) for a query with no prefix (an empty CFG history)."""
        return KVWorkspace(
            torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device), 0
        )

    def tail(self) -> KV:
        """The query's K/V, as written by the last forward (views, not copies)."""
        return KV(self.k[:, self.n_past :], self.v[:, self.n_past :])


Workspaces = tuple[KVWorkspace, ...]
"""Equal-length queries side by side, each after its own prefix: the CFG branches of one denoising step
run as one forward (one pass over the weights, larger matmuls); only attention is done per branch."""


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.rope_theta = cfg.rope_theta
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(cfg.hidden_size, q_dim))
            setattr(self, f"k_proj{suffix}", nn.Linear(cfg.hidden_size, kv_dim))
            setattr(self, f"v_proj{suffix}", nn.Linear(cfg.hidden_size, kv_dim))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, cfg.hidden_size, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(self.head_dim, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(self.head_dim, cfg.rms_norm_eps))

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
        x: torch.Tensor,  # (n, hidden)
        positions: torch.Tensor,  # (n,) rope ids
        routing: Routing,
        past: tuple[torch.Tensor, torch.Tensor] | None,  # (n_past, h_kv, d) each
        causal: bool,
        backend: Backend,
        mask: torch.Tensor | None = None,
        tails: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output (n, hidden), k (n, h_kv, d), v (n, h_kv, d)) for the new tokens.

        With `tails` (one K/V buffer per equal part of the query, each with room for its part at the end)
        the parts' K/V are written there in place and each part attends over its own buffer; `past` is
        then unused."""
        qkv = routing.apply(self._qkv(""), self._qkv("_moe_gen"), x)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if tails is not None:
            n = x.shape[0] // len(tails)
            outs = []
            for j, (keys, values) in enumerate(tails):
                part = slice(j * n, (j + 1) * n)
                keys[-n:], values[-n:] = k[part], v[part]
                outs.append(attention(q[part], keys, values, causal=causal, backend=backend, mask=mask))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        else:
            keys, values = (k, v) if past is None else (torch.cat([past[0], k]), torch.cat([past[1], v]))
            out = attention(q, keys, values, causal=causal, backend=backend, mask=mask)
        return routing.apply(self.o_proj, self.o_proj_moe_gen, out.reshape(x.shape[0], -1)), k, v


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x, positions, routing: Routing, past, causal: bool, backend: Backend, mask=None, tails=None
    ):
        h = routing.apply(self.input_layernorm, self.input_layernorm_moe_gen, x)
        attn, k, v = self.self_attn(h, positions, routing, past, causal, backend, mask, tails)
        x = x + attn
        h = routing.apply(
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
            x,
        )
        return x + h, k, v


class MoTDecoder(nn.Module):
    """`language_model.model` of the checkpoint: embeddings, layers, and the two final norms."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # (n, hidden) input embeddings
        positions: torch.Tensor,
        routing: Routing,
        past: KV | KVWorkspace | Workspaces | None,
        causal: bool,
        backend: Backend = "auto",
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV | tuple[KV, ...]]:
        """Run all layers; returns the final-norm hidden states and the new tokens' K/V (per part, for
        `Workspaces`: x then holds the parts one after another, each as long as its workspace's query).

        `mask` (n, n_past + n) bool overrides `causal` (see `attention`)."""
        parts = (past,) if isinstance(past, KVWorkspace) else past if isinstance(past, tuple) else None
        if parts is not None and mask is not None and len(parts) > 1:
            raise ValueError("a mask applies to one query; run masked queries one at a time")
        if isinstance(past, KV) and past.length == 0:
            past = None
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            tails = None if parts is None else [(w.k[i], w.v[i]) for w in parts]
            layer_past = None if past is None or parts is not None else (past.k[i], past.v[i])
            x, k, v = layer(x, positions, routing, layer_past, causal, backend, mask, tails)
            ks.append(k)
            vs.append(v)
        x = routing.apply(self.norm, self.norm_moe_gen, x)
        if isinstance(past, KVWorkspace):
            return x, past.tail()
        if parts is not None:
            return x, tuple(w.tail() for w in parts)
        return x, KV(torch.stack(ks), torch.stack(vs))


class LanguageModel(nn.Module):
    """`language_model` of the checkpoint: the decoder plus an untied `lm_head`."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = MoTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
