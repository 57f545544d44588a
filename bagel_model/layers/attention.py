"""Scaled dot-product attention behind one function, for every module of the model.

Shapes: q (n_q, h, d), k and v (n_k, h_kv, d) with h a multiple of h_kv (grouped-query attention).
One call attends one sequence: queries are the *last* n_q positions of the n_k keys, so a causal mask is
aligned to the bottom right (query i sees keys 0 .. i + n_k - n_q), which is what decoding and prefilling
against a KV cache need.

Backends: PyTorch SDPA everywhere (CPU included); flash-attn when it is installed, the tensors are on CUDA
in half precision, and the backend allows it. flash-attn is imported lazily: it is CUDA-only and must never
be a requirement.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "sdpa", "flash"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash")


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def flash_available() -> bool:
    return torch.cuda.is_available() and _flash_attn_func() is not None


def check_backend(backend: str) -> None:
    """Raise a clear error for a backend that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "flash" and not flash_available():
        raise ValueError(
            "attention backend 'flash' needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use 'sdpa' instead"
        )


def _causal_mask(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """(n_q, n_k) bool, True where attention is allowed; bottom-right aligned."""
    rows = torch.arange(n_q, device=device).unsqueeze(1) + (n_k - n_q)
    return torch.arange(n_k, device=device).unsqueeze(0) <= rows


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    backend: Backend = "auto",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend q to k/v of one sequence; returns (n_q, h, d) in q's dtype.

    `mask` (n_q, n_k) bool, True where allowed, replaces the causal rule when given (training packs
    sequences whose noisy images are hidden from later tokens, which no flag expresses)."""
    n_q, n_k = q.shape[0], k.shape[0]
    use_flash = mask is None and (
        backend == "flash"
        or (
            backend == "auto"
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and flash_available()
        )
    )
    if use_flash:
        # flash-attn aligns its causal mask to the bottom right, as we need.
        return _flash_attn_func()(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal=causal)[0]
    if mask is None and causal and n_q > 1:
        mask = _causal_mask(n_q, n_k, q.device)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not q.is_cuda:
        # SDPA's enable_gqa falls back to a path ~30x slower on CPU; repeating the KV heads is cheaper.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    # 4-D (batch, heads, n, d) inputs: 3-D ones take a CPU path several times slower.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, h, n_q, d)
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        enable_gqa=groups > 1 and q.is_cuda,
    )
    return out[0].transpose(0, 1)
