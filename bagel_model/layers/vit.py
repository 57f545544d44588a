"""The SigLIP NaViT image encoder of BAGEL: packed patches of several images in, one feature per patch out.

Architecture (official `modeling/bagel/siglip_navit.py` with `rope=False`): a linear patch embedding (the
SigLIP conv kernel stored flattened, columns in (py, px, c) order), plus a learned absolute position
embedding indexed by the flattened patch position; pre-LN encoder layers with bidirectional attention
inside each image only and a tanh-GELU MLP; a final LayerNorm. The number of layers is the config's (the
official code drops the last layer of `vit_config.json`; `ViTConfig` already counts the used ones).
Module and parameter names mirror the official ones, so the state dict loads as is from the `vit_model.`
entries of `ema.safetensors`.

Not here: turning pixels into patches and position ids (`bagel_model.images`), the connector and the
sin-cos position table added after it (the BAGEL wrapper), and any weight loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ViTConfig
from .attention import Backend, attention
from .ops import TORCH, Ops

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        self.patch_embedding = ops.Linear(config.patch_dim, config.hidden_size)
        side = config.image_size // config.patch_size
        self.position_embedding = ops.Embedding(side * side, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = ops.Linear(dim, dim)
        self.k_proj = ops.Linear(dim, dim)
        self.v_proj = ops.Linear(dim, dim)
        self.out_proj = ops.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seq_lens: list[int], backend: Backend) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (proj(x).view(n, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # One attention call per image: the images of a pack never see each other. SDPA's default scale
        # is 1/sqrt(head_dim), the SigLIP one.
        out = torch.cat(
            [
                attention(qi, ki, vi, causal=False, backend=backend)
                for qi, ki, vi in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=True)
            ]
        )  # (n, h, d)
        return self.out_proj(out.reshape(n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = ops.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = ops.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        self.layer_norm1 = ops.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config, ops)
        self.layer_norm2 = ops.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config, ops)

    def forward(self, x: torch.Tensor, seq_lens: list[int], backend: Backend) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seq_lens, backend)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config, ops) for _ in range(config.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config, ops)
        self.encoder = SiglipEncoder(config, ops)
        self.post_layernorm = ops.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """`vision_model.*` holds every parameter, as in the official checkpoint (prefix `vit_model.` there).

    Build on the `meta` device and load with `load_state_dict(..., assign=True)` to avoid allocating twice.
    """

    def __init__(self, config: ViTConfig, ops: Ops = TORCH):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"ViT hidden_act {config.hidden_act!r} is not supported; "
                f"choose one of {', '.join(_ACTIVATIONS)}"
            )
        if config.image_size % config.patch_size:
            raise ValueError(
                f"ViT image_size {config.image_size} is not a multiple of patch_size {config.patch_size}"
            )
        self.config = config
        self.vision_model = SiglipVisionTransformer(config, ops)

    def forward(
        self,
        patches: torch.Tensor,
        position_ids: torch.Tensor,
        seq_lens: list[int],
        attn_backend: Backend = "auto",
    ) -> torch.Tensor:
        """patches (n, patch_dim) of one or more images packed in order, position_ids (n,) into the
        learned table, seq_lens the tokens of each image (summing to n) -> (n, hidden) features after
        `post_layernorm`, in the dtype of the weights."""
        n = patches.shape[0]
        if patches.ndim != 2 or patches.shape[1] != self.config.patch_dim:
            raise ValueError(f"patches must be (n, {self.config.patch_dim}), got {tuple(patches.shape)}")
        if position_ids.shape != (n,):
            raise ValueError(f"position_ids must be ({n},), got {tuple(position_ids.shape)}")
        seq_lens = [int(s) for s in seq_lens]
        if sum(seq_lens) != n or any(s < 1 for s in seq_lens):
            raise ValueError(f"seq_lens {seq_lens} must be positive and sum to the {n} patches")
        vm = self.vision_model
        x = vm.embeddings(patches.to(vm.embeddings.patch_embedding.weight.dtype), position_ids)
        for layer in vm.encoder.layers:
            x = layer(x, seq_lens, attn_backend)
        return vm.post_layernorm(x)
