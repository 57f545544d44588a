"""Position and time embeddings: the frozen 2-D sin-cos tables, RoPE, and the flow-time embedder.

The sin-cos tables are stored in the official checkpoint; we compute them only to write new checkpoints
and to check loaded ones. Their layout (column coordinate in the first half of the dims, sin before cos,
float64 then float32) is what the official tables hold, so a recomputed table equals the stored one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .ops import TORCH, Ops


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) float32 table; row r*grid + c encodes (row r, column c)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij"
    )

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    return torch.from_numpy(table).float()


class PositionTable(nn.Module):
    """A frozen sin-cos table indexed by flattened 2-D position id (official `PositionEmbedding`)."""

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid
        self.register_buffer("pos_embed", torch.empty(grid * grid, dim))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        # A memory manager that loads the model partly may leave this buffer on another device.
        return self.pos_embed.to(position_ids.device)[position_ids]


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] (not scaled by 1000) -> hidden vector, DiT style with cos before sin."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, ops: Ops = TORCH):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            ops.Linear(freq_dim, hidden_size), nn.SiLU(), ops.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float().reshape(-1, 1) * freqs
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2 'rotate_half' RoPE tables for the given positions: two (n, 1, head_dim) tensors.

    Computed in float32 and cast to the hidden dtype, as the official code does."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    )
    angles = positions.float().unsqueeze(1) * inv_freq  # (n, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (n, 1, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (n, h, d) rotated by the (n, 1, d) tables."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
