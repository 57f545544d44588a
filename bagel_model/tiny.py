"""Write a tiny random BAGEL checkpoint in exactly the official folder layout.

Tests and newcomers need a model that loads through the same code path as BAGEL-7B-MoT without a 29 GB
download. The weights are random (seeded), the configs are small, the tokenizer is a byte-level BPE
trained on a fixed corpus with the four BAGEL markers, and every file has the official name and format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .checkpoint import _NoInitOnMeta, default_dtype, fill, save, tensor_shapes
from .config import TINY_CONFIG, BagelConfig
from .layers.attention import check_backend
from .layers.embeddings import PositionTable, sincos_2d_table
from .layers.ops import TORCH, Ops
from .layers.vae import AutoEncoder
from .model import Bagel, BagelModel
from .quant import BNB_MODES, WEIGHT_MODES, bitsandbytes, quantize_linears
from .tokenizer import MARKERS, BagelTokenizer

_CORPUS = """
a red circle at the top left, a blue square at the center, a green triangle at the bottom right.
a yellow circle at the top, a purple square at the right, at the left, at the bottom, at the top right.
how many shapes are there? what color is the circle? what shape is at the center? where is the red circle?
describe the image. make the circle green. move the red circle to the bottom right. add a blue triangle at
the top. remove the square. the color of the sky, of grass, of a banana, of a strawberry, of an eggplant.
a shape with three corners, with four equal sides, with no corners. draw one. <think> </think>
You should first think about the reasoning process in the mind and then provide the user with the answer.
The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think>
answer here. planning process, generate the image, image here. moves right left up down 0 1 2 3 4 5 6 7 8 9
"""


def write_tokenizer(folder: Path, vocab_size: int, corpus: str = _CORPUS) -> None:
    """A byte-level BPE in Qwen2's file formats: tokenizer.json (fast) and vocab.json/merges.txt (slow),
    trained on the non-empty lines of `corpus` (by default a few lines of the shapes world's words)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", *MARKERS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in corpus.splitlines() if line], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))  # vocab.json, merges.txt
    added = {str(tok.token_to_id(t)): {"content": t, "special": True} for t in specials}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": list(MARKERS),
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight") or ".norm" in name or "layernorm" in name or "layer_norm" in name


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded random weights; norms near one so routing mistakes change the numbers."""
    for name, p in module.named_parameters():
        if _is_norm(name):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    for sub in module.modules():
        if isinstance(sub, PositionTable):
            sub.pos_embed.copy_(sincos_2d_table(sub.pos_embed.shape[1], sub.grid))


def make_tiny(folder: Path | str, seed: int = 0, cfg: BagelConfig = TINY_CONFIG) -> Path:
    """Write a random checkpoint of `cfg` to `folder` (created) and return the folder."""
    folder = Path(folder)
    generator = torch.Generator().manual_seed(seed)
    net, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    randomize(net, generator)
    randomize(vae, generator)
    save(net, vae, cfg, folder)
    write_tokenizer(folder, cfg.llm.vocab_size)
    return folder


@torch.no_grad()
def _fill_random(
    module: nn.Module, generator: torch.Generator, dtype: torch.dtype, weight_mode: str = "native"
) -> None:
    """Fill a meta-built `module` tensor by tensor with `randomize`'s distribution, each drawn on the
    generator's device and loaded as `checkpoint.stream_weights` loads a file's (quantized layers
    quantize theirs), so at most one full-precision tensor exists at a time."""
    device = generator.device
    shapes = tensor_shapes(module)  # before quantizing renames them
    if weight_mode != "native":
        quantize_linears(module, weight_mode, dtype)

    def draw() -> Iterator[tuple[str, torch.Tensor]]:
        for key, shape in shapes.items():
            owner = module.get_submodule(key.rpartition(".")[0])
            if isinstance(owner, PositionTable):
                value = sincos_2d_table(shape[1], owner.grid).to(device)
            elif _is_norm(key):
                value = torch.randn(shape, generator=generator, device=device).mul_(0.1).add_(1)
            else:
                value = torch.randn(shape, generator=generator, device=device).mul_(0.05)
            yield key, value.to(dtype)

    fill(module, shapes, draw(), Path("<random weights>"))


def random_model(
    cfg: BagelConfig,
    tokenizer_folder: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    weights: str = "native",
    attention: str = "auto",
    seed: int = 0,
    ops: Ops = TORCH,
) -> BagelModel:
    """A model of `cfg` with seeded random weights made where they will live, with no checkpoint file:
    built on meta as `checkpoint.load` builds it, in the same weight modes and attention backends. A
    7B-shaped model takes seconds on a GPU this way, where writing and reading its 29 GB file takes
    minutes (benchmarks). The same seed, device and config give the same weights in every mode.
    `tokenizer_folder` holds the tokenizer (`write_tokenizer`) and is the model's `source`; `ops` are the
    layer classes, as `checkpoint.load` takes them (ComfyUI's casting layers for a ComfyUI-managed model)."""
    check_backend(attention)
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weight mode {weights!r} is unknown; choose one of {', '.join(WEIGHT_MODES)}")
    if weights in BNB_MODES:
        bitsandbytes()
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    tokenizer = BagelTokenizer(Path(tokenizer_folder))
    with torch.device("meta"), _NoInitOnMeta():
        net, vae = Bagel(cfg, ops), AutoEncoder(cfg.vae, ops)
    generator = torch.Generator(device).manual_seed(seed)
    _fill_random(net, generator, dtype, weights)
    _fill_random(vae, generator, torch.float32)
    net.attn_backend = attention
    return BagelModel(net.eval(), vae.eval(), tokenizer, cfg, Path(tokenizer_folder))
