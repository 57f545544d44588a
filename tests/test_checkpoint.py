"""The loader: official key layout, strict loading, table-size inference, streaming dtypes, and an error
message for every way a model folder can be wrong.

The 7B key list (`reference/bagel_ema_keys.json`) was enumerated from the official modules; it pins our
module tree to the released `ema.safetensors` without downloading 29 GB.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bagel_model
from bagel_model import CheckpointError
from bagel_model.config import BAGEL_7B_MOT
from bagel_model.layers.embeddings import sincos_2d_table
from bagel_model.layout import LATENT_TABLE, OFFICIAL_FILES, VIT_TABLE, read_config
from bagel_model.model import Bagel
from bagel_model.tokenizer import MARKERS, BagelTokenizer, MarkerIds, TokenizerError

OFFICIAL_7B_TENSORS = 1223
OFFICIAL_7B_ELEMENTS = 14_607_260_128
LAYER_KEY = re.compile(
    r"^(language_model\.model\.layers|vit_model\.vision_model\.encoder\.layers)\.(\d+)\.(.+)$"
)


def _layout(keys) -> tuple[dict[str, dict[int, frozenset[str]]], frozenset[str]]:
    """Split tensor names into {layer stack: {index: suffixes}} and the set of non-layer names."""
    stacks: dict[str, dict[int, set[str]]] = {}
    other = set()
    for key in keys:
        m = LAYER_KEY.match(key)
        if m:
            stacks.setdefault(m[1], {}).setdefault(int(m[2]), set()).add(m[3])
        else:
            other.add(key)
    return {s: {i: frozenset(v) for i, v in layers.items()} for s, layers in stacks.items()}, frozenset(other)


def _mirror(src: Path, dst: Path, skip: tuple[str, ...] = (), copy: tuple[str, ...] = ()) -> Path:
    """A model folder at dst: symlinks to src's files, real copies of `copy`, nothing for `skip`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name in skip:
            continue
        if f.name in copy:
            shutil.copyfile(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def _edit_json(folder: Path, name: str, **changes) -> None:
    data = json.loads((folder / name).read_text())
    data.update(changes)
    (folder / name).unlink()  # may be a symlink into the shared tiny folder
    (folder / name).write_text(json.dumps(data))


# -- the official layout -----------------------------------------------------------------------------


def test_7b_module_tree_is_the_official_key_list(official_7b_keys):
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Bagel(BAGEL_7B_MOT).state_dict().items()}
    assert len(official_7b_keys) == OFFICIAL_7B_TENSORS
    missing = sorted(set(official_7b_keys) - set(ours))
    extra = sorted(set(ours) - set(official_7b_keys))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    wrong = {k: (ours[k], s) for k, s in official_7b_keys.items() if ours[k] != s}
    assert not wrong, f"(ours, official) shapes differ: {dict(list(wrong.items())[:5])}"
    assert sum(math.prod(s) for s in ours.values()) == OFFICIAL_7B_ELEMENTS


def test_tiny_round_trips(tiny_dir, tiny_model):
    """make_tiny -> load: every tensor of both files is in the model, by name, bit for bit."""
    for module, name in ((tiny_model.net, "ema.safetensors"), (tiny_model.vae, "ae.safetensors")):
        file, state = load_file(tiny_dir / name), module.state_dict()
        assert state.keys() == file.keys()
        for key, tensor in file.items():
            assert tensor.dtype == torch.float32, key
            assert torch.equal(state[key], tensor), key


def test_tiny_has_the_official_key_pattern_scaled_down(tiny_dir, tiny_model, official_7b_keys):
    net_file = load_file(tiny_dir / "ema.safetensors")
    cfg = tiny_model.config
    big_stacks, big_other = _layout(official_7b_keys)
    tiny_stacks, tiny_other = _layout(net_file)
    assert tiny_other == big_other
    assert tiny_stacks.keys() == big_stacks.keys()
    depth = {
        "language_model.model.layers": (BAGEL_7B_MOT.llm.num_hidden_layers, cfg.llm.num_hidden_layers),
        "vit_model.vision_model.encoder.layers": (
            BAGEL_7B_MOT.vit.num_hidden_layers,
            cfg.vit.num_hidden_layers,
        ),
    }
    for stack, (big_n, tiny_n) in depth.items():
        assert sorted(big_stacks[stack]) == list(range(big_n)), stack
        assert sorted(tiny_stacks[stack]) == list(range(tiny_n)), stack
        (suffixes,) = set(big_stacks[stack].values())  # every 7B layer has the same tensors
        assert all(s == suffixes for s in tiny_stacks[stack].values()), stack
    # Same tensor ranks as the 7B file, key by key with the layer index dropped.
    rank = {LAYER_KEY.sub(r"\1.\3", k): len(s) for k, s in official_7b_keys.items()}
    assert all(rank[LAYER_KEY.sub(r"\1.\3", k)] == t.ndim for k, t in net_file.items())
    # vit_config.json lists one layer more than is used, as the official file does.
    vit_json = json.loads((tiny_dir / "vit_config.json").read_text())
    assert vit_json["num_hidden_layers"] == cfg.vit.num_hidden_layers + 1


# Sin-cos table sizes (latent, ViT) of each official reference: its image limits set them (in-repository
# README), the shared one keeps the released model's 64 and 70.
TABLE_SIDES = {"in_repo": (16, 16), "shared": (64, 70)}


def test_official_tiny_loads_strictly_with_sincos_tables(official_tiny, official_model, reference_name):
    net = official_model.net
    file = load_file(official_tiny / "ema.safetensors")
    state = net.state_dict()
    assert state.keys() == file.keys()
    assert all(torch.equal(state[k], v) for k, v in file.items())
    cfg = read_config(official_tiny)
    latent_side, vit_side = TABLE_SIDES[reference_name]
    assert (cfg.max_latent_size, cfg.vit_max_num_patch_per_side) == (latent_side, vit_side)
    d = cfg.llm.hidden_size
    stored = file[LATENT_TABLE].dtype  # the in-repository checkpoint stores bf16, the shared one fp32
    for table, side in ((net.latent_pos_embed, latent_side), (net.vit_pos_embed, vit_side)):
        assert torch.equal(table.pos_embed, sincos_2d_table(d, side).to(stored).to(table.pos_embed.dtype))
    added = json.loads((official_tiny / "tokenizer.json").read_text())["added_tokens"]
    vocab = {t["content"]: t["id"] for t in added}
    assert official_model.tokenizer.markers == MarkerIds(*(vocab[m] for m in MARKERS))


def test_table_sizes_are_read_from_the_weights(tiny_dir, tmp_path):
    """64 and 70 are also the config defaults; other table sizes prove they come from the file."""
    folder = _mirror(tiny_dir, tmp_path / "m", skip=("ema.safetensors",))
    tensors = load_file(tiny_dir / "ema.safetensors")
    d = tensors[LATENT_TABLE].shape[1]
    tensors[LATENT_TABLE], tensors[VIT_TABLE] = sincos_2d_table(d, 80), sincos_2d_table(d, 20)
    save_file(tensors, folder / "ema.safetensors")
    cfg = read_config(folder)
    assert (cfg.max_latent_size, cfg.vit_max_num_patch_per_side) == (80, 20)
    model = bagel_model.load(folder)
    assert model.net.latent_pos_embed.pos_embed.shape == (80 * 80, d)
    assert model.net.vit_pos_embed.pos_embed.shape == (20 * 20, d)

    tensors[VIT_TABLE] = sincos_2d_table(d, 20)[:-1]
    save_file(tensors, folder / "ema.safetensors")
    with pytest.raises(CheckpointError, match=rf"{VIT_TABLE} has 399 rows, not a square grid"):
        read_config(folder)


# -- bad folders -------------------------------------------------------------------------------------


def test_empty_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a BAGEL checkpoint folder"):
        bagel_model.load(tmp_path)


def test_folder_of_unrelated_files_is_not_a_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("# my model")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="is not a BAGEL checkpoint folder"):
        bagel_model.load(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        bagel_model.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", OFFICIAL_FILES)
def test_missing_file_is_named(tiny_dir, tmp_path, name):
    folder = _mirror(tiny_dir, tmp_path / "m", skip=(name,))
    with pytest.raises(
        CheckpointError, match=rf"is missing {re.escape(name)}( \(or .*\))?; the download may be incomplete"
    ):
        bagel_model.load(folder)


@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors"])
def test_truncated_weights_are_named(tiny_dir, tmp_path, name):
    folder = _mirror(tiny_dir, tmp_path / "m", copy=(name,))
    os.truncate(folder / name, (folder / name).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is not a readable .* may be truncated"):
        bagel_model.load(folder)


def test_config_with_more_layers_lists_the_missing_tensors(tiny_dir, tiny_model, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m")
    n = tiny_model.config.llm.num_hidden_layers
    _edit_json(folder, "llm_config.json", num_hidden_layers=n + 1)
    per_layer = sum(k.startswith("language_model.model.layers.0.") for k in tiny_model.net.state_dict())
    with pytest.raises(CheckpointError) as err:
        bagel_model.load(folder)
    msg = str(err.value)
    assert "ema.safetensors does not match the model its config files describe" in msg
    assert f"{per_layer} missing tensor(s), first: language_model.model.layers.{n}." in msg
    assert "unexpected" not in msg and "llm_config.json" in msg


def test_config_with_fewer_layers_lists_the_unexpected_tensors(tiny_dir, tiny_model, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m")
    n = tiny_model.config.llm.num_hidden_layers
    _edit_json(folder, "llm_config.json", num_hidden_layers=n - 1)
    with pytest.raises(
        CheckpointError, match=rf"unexpected tensor\(s\), first: language_model\.model\.layers\.{n - 1}\."
    ):
        bagel_model.load(folder)


def test_config_with_other_widths_lists_shapes(tiny_dir, tiny_model, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m")
    cfg = tiny_model.config.llm
    _edit_json(folder, "llm_config.json", intermediate_size=2 * cfg.intermediate_size)
    with pytest.raises(CheckpointError) as err:
        bagel_model.load(folder)
    msg = str(err.value)
    assert "ema.safetensors does not match" in msg
    # 6 MLP matrices per layer (both experts), the first 5 shown with file and expected shapes.
    assert f"{6 * cfg.num_hidden_layers} tensor(s) with the wrong shape" in msg
    i, h = cfg.intermediate_size, cfg.hidden_size
    assert f"language_model.model.layers.0.mlp.gate_proj.weight is [{i}, {h}], expected [{2 * i}, {h}]" in msg
    assert f"language_model.model.layers.0.mlp.down_proj.weight is [{h}, {i}], expected [{h}, {2 * i}]" in msg


def test_ae_config_that_does_not_match_names_the_ae_file(tiny_dir, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m")
    _edit_json(folder, "ae_config.json", ch=64)
    with pytest.raises(
        CheckpointError,
        match=r"ae\.safetensors does not match .*wrong shape: encoder\.conv_in\.weight is \[32, 3, 3, 3\], "
        r"expected \[64, 3, 3, 3\]",
    ):
        bagel_model.load(folder)


def test_extra_tensor_is_unexpected(tiny_dir, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m", skip=("ema.safetensors",))
    tensors = load_file(tiny_dir / "ema.safetensors")
    tensors["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, folder / "ema.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"ema\.safetensors does not match .*: 1 unexpected tensor\(s\), first: "
        r"language_model\.model\.layers\.0\.self_attn\.rotary_emb\.inv_freq\.",
    ):
        bagel_model.load(folder)


@pytest.mark.parametrize(
    "name", ["llm_config.json", "vit_config.json", "ae_config.json", "bagel_inference.json"]
)
def test_invalid_json_is_named(tiny_dir, tmp_path, name):
    folder = _mirror(tiny_dir, tmp_path / "m", skip=(name,))
    (folder / name).write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is not valid JSON"):
        bagel_model.load(folder)


def test_config_lacking_a_field_names_it(tiny_dir, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m", skip=("llm_config.json",))
    data = json.loads((tiny_dir / "llm_config.json").read_text())
    del data["num_key_value_heads"]
    (folder / "llm_config.json").write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=r"llm_config\.json lacks required field\(s\) num_key_value_heads"
    ):
        bagel_model.load(folder)


@pytest.mark.parametrize("marker", MARKERS)
def test_tokenizer_missing_a_marker_names_it(tiny_dir, tmp_path, marker):
    folder = _mirror(tiny_dir, tmp_path / "m", skip=("tokenizer.json",))
    tok = json.loads((tiny_dir / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != marker]
    del tok["model"]["vocab"][marker]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerError, match=rf"lacks the BAGEL marker token\(s\) {re.escape(marker)}$"):
        bagel_model.load(folder)


def test_folder_without_tokenizer(tiny_dir, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m", skip=("tokenizer.json", "vocab.json", "merges.txt"))
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        bagel_model.load(folder)


def test_tokenizer_larger_than_the_embedding(tiny_dir, tiny_model, tmp_path):
    folder = _mirror(tiny_dir, tmp_path / "m")
    _edit_json(folder, "llm_config.json", vocab_size=len(tiny_model.tokenizer) - 1)
    with pytest.raises(CheckpointError, match=rf"the tokenizer has {len(tiny_model.tokenizer)} tokens"):
        bagel_model.load(folder)


# -- streaming ---------------------------------------------------------------------------------------


def test_bf16_load_keeps_the_ae_in_fp32_and_leaves_nothing_on_meta(tiny_dir):
    model = bagel_model.load(tiny_dir, dtype=torch.bfloat16)
    file = load_file(tiny_dir / "ema.safetensors")
    net_tensors = dict(model.net.named_parameters()) | dict(model.net.named_buffers())
    ae_tensors = dict(model.vae.named_parameters()) | dict(model.vae.named_buffers())
    for name, t in net_tensors.items():
        assert t.device == torch.device("cpu") and not t.is_meta, name
        assert t.dtype == torch.bfloat16, name
        assert torch.equal(t, file[name].to(torch.bfloat16)), name
    for name, t in ae_tensors.items():
        assert t.device == torch.device("cpu") and not t.is_meta, name
        assert t.dtype == torch.float32, name
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")

    half_ae = bagel_model.load(tiny_dir, dtype=torch.bfloat16, vae_dtype=torch.bfloat16).vae
    assert {p.dtype for p in half_ae.parameters()} == {torch.bfloat16}


TEXTS = ["describe the image.", "Hello, world! 123 4567", "  two  spaces\tand\nlines", "émoji 🎨 中文", ""]


def test_tokenizer_matches_the_official_slow_qwen2_tokenizer(official_tiny, tmp_path):
    """Our ids come from tokenizer.json through `tokenizers`; the official code uses transformers' slow
    Qwen2Tokenizer on vocab.json + merges.txt. Both, and our vocab/merges-only fallback, must agree."""
    transformers = pytest.importorskip("transformers")
    slow = transformers.AutoTokenizer.from_pretrained(str(official_tiny), use_fast=False)
    ours = BagelTokenizer(official_tiny)
    fallback = BagelTokenizer(_mirror(official_tiny, tmp_path / "m", skip=("tokenizer.json",)))
    for text in TEXTS:
        ids = slow.encode(text, add_special_tokens=False)
        assert ours.encode(text) == fallback.encode(text) == ids, text
        assert ours.decode(ids) == slow.decode(ids)
    assert ours.markers == fallback.markers
    assert ours.markers.bos == slow.convert_tokens_to_ids("<|im_start|>")


def test_loading_skips_initializers_and_never_imports_dynamo(tiny_dir):
    """Initializers on meta tensors go through torch._refs, which imports torch._dynamo and sympy: ~2 s
    of every load. The loader builds with them switched off (in a fresh process: tests import dynamo)."""
    code = (
        "import sys, bagel_model\n"
        f"bagel_model.load({str(tiny_dir)!r})\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
