"""The memory LoRA training of BAGEL-7B-MoT needs, computed (no GPU): weights per base mode + adapter and
AdamW state + activations, for one example per step at 512² and 1024², text-to-image and edit.

    python benchmarks/lora_memory.py [--rank 16] [--targets gen]

Weights are counted from the 7B config built on the meta device (every tensor of the checkpoint, AE
included): native bf16, fp8 (1 byte per decoder weight + a float32 scale per row), nf4 (bitsandbytes: half a
byte per weight + a double-quantized absmax per 64 weights, ~1/64 byte). The adapter trains in float32:
weight, gradient and AdamW's two moments, 16 bytes per factor entry.

Activations (gradient checkpointing on, as `train-lora` does by default): each layer's input is kept for
the backward pass (bf16, hidden per token), and one layer is recomputed at a time, whose autograd state per
token is counted term by term in `layer_bytes_per_token`; its backward needs about as much again. The LoRA
branch casts each adapted layer's input to float32 (as PEFT does): counted for every token, so the figure is
an upper bound when only one expert is adapted. Not counted: the CUDA context and allocator slack
(~1-2 GB), the ViT and VAE forwards (run without a graph), the dense attention mask (n² bytes: 0.2 GB at
the 13k tokens of a 1024² edit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bagel_model.config import BAGEL_7B_MOT, BagelConfig  # noqa: E402
from bagel_model.images import resize_dims  # noqa: E402
from bagel_model.layers.vae import AutoEncoder  # noqa: E402
from bagel_model.model import Bagel  # noqa: E402
from bagel_model.quant import quantized_targets  # noqa: E402
from bagel_model.training.adapters import TARGETS, targeted  # noqa: E402

GB = 1e9
TEXT_TOKENS = 40  # a caption or an instruction, with its markers


def weight_bytes(net: Bagel, ae: AutoEncoder, mode: str) -> float:
    quantized = {f"{name}.weight" for name in quantized_targets(net)}
    total = 0.0
    for name, p in [*net.named_parameters(), *net.named_buffers()]:
        if mode == "native" or name not in quantized:
            total += p.numel() * 2
        elif mode == "fp8":
            total += p.numel() * 1 + p.shape[0] * 4
        else:  # nf4
            total += p.numel() * (0.5 + 1 / 64)
    return total + sum(p.numel() * 2 for p in ae.parameters())


def adapter_params(net: Bagel, targets: str, rank: int) -> int:
    layers = [net.get_submodule(name) for name in targeted(net, TARGETS[targets])]
    return sum(rank * (m.in_features + m.out_features) for m in layers)


def layer_bytes_per_token(cfg: BagelConfig) -> float:
    """Autograd state of one recomputed decoder layer, per token (bf16 = 2 bytes, the LoRA inputs 4)."""
    h, i = cfg.llm.hidden_size, cfg.llm.intermediate_size
    kv = cfg.llm.num_key_value_heads * cfg.llm.head_dim
    bf16 = (
        2 * h  # input norm: its input and output
        + 2 * (h + 2 * kv)  # q, k, v projections, and their norm + RoPE
        + 2 * h  # attention output (o_proj input) and the residual
        + 2 * h  # post-attention norm: input and output
        + 4 * i  # gate, up, silu(gate), product (down_proj input)
    )
    lora_fp32 = 6 * h + i  # float32 inputs of q, k, v, o, gate, up (hidden) and down (intermediate)
    return 2 * bf16 + 4 * lora_fp32


def tokens(cfg: BagelConfig, side: int, task: str) -> int:
    vae, vit = cfg.inference.vae_limits, cfg.inference.vit_limits
    w, h = resize_dims(side, side, vae)
    latent = (w // cfg.latent_downsample) * (h // cfg.latent_downsample)
    vw, vh = resize_dims(w, h, vit)
    vit_tokens = (vw // cfg.vit.patch_size) * (vh // cfg.vit.patch_size)
    if task == "t2i":
        return TEXT_TOKENS + latent + 2
    return TEXT_TOKENS + 2 * (latent + 2) + vit_tokens + 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="gen", choices=sorted(TARGETS))
    args = p.parse_args()
    cfg = BAGEL_7B_MOT
    with torch.device("meta"):
        net, ae = Bagel(cfg), AutoEncoder(cfg.vae)
    lora = adapter_params(net, args.targets, args.rank) * 16
    per_layer = layer_bytes_per_token(cfg)
    layers = cfg.llm.num_hidden_layers
    print(f"adapter ({args.targets}, rank {args.rank}): {lora / 16 / 1e6:.1f} M factors, {lora / GB:.2f} GB "
          "with gradients and AdamW")  # fmt: skip
    print("| base weights | size | task | tokens | weights GB | activations GB | total GB |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("native", "fp8", "nf4"):
        weights = weight_bytes(net, ae, mode)
        for side in (512, 1024):
            for task in ("t2i", "edit"):
                n = tokens(cfg, side, task)
                activations = n * (layers * 2 * cfg.llm.hidden_size + 2 * per_layer)
                total = weights + lora + activations
                print(f"| {mode} | {side}² | {task} | {n} | {weights / GB:.1f} | {activations / GB:.1f} | "
                      f"{total / GB:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
