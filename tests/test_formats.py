"""Every BAGEL-format checkpoint as published, through the CLI and the library: fine-tune folders whose
weights are model.safetensors / model_bf16.safetensors or shards with an index (beside a config.json that
is not JSON), and the ComfyUI single file with its configs in its metadata header or in a sidecar. Each is
the bundled model rewritten by the test, so each must draw the bundled folder's image, pixel for pixel;
each way such a checkpoint can be broken is an error naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bagel_model
from bagel_model import CheckpointError, cli
from bagel_model.bundled import default_model_dir
from bagel_model.config import BAGEL_7B_MOT
from bagel_model.layout import LATENT_TABLE, METADATA_KEY, SIDECAR_SUFFIX, VIT_TABLE, read_config
from bagel_model.tokenizer import MARKERS, BagelTokenizer

BUNDLED = default_model_dir()
CONFIGS = ("llm_config.json", "vit_config.json", "ae_config.json", "bagel_inference.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
INDEX = "model.safetensors.index.json"
SHARDS = 3


def generate(model: Path, out: Path, *extra) -> Path:
    """`python -m bagel_model generate` in this process (the same argv, without a fresh interpreter's
    seconds of imports); returns the image it wrote."""
    argv = ["generate", "--model", model, "--prompt", "a red circle at the center", "--seed", 3]
    argv += ["--steps", 5, "--out", out, "--json", *extra]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([str(a) for a in argv])
    assert rc == 0, stderr.getvalue()
    return Path(json.loads(stdout.getvalue())["image"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> np.ndarray:
    """The bundled folder's image for the prompt and seed every layout is asked for."""
    out = generate(BUNDLED, tmp_path_factory.mktemp("reference") / "bundled.png")
    return _pixels(out)


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _folder(dst: Path, weights: str | None = "ema.safetensors") -> Path:
    """A model folder at dst: the bundled configs, tokenizer and AE; its network as `weights` (None: none)."""
    dst.mkdir(parents=True)
    for name in (*CONFIGS, *TOKENIZER_FILES, "ae.safetensors"):
        (dst / name).symlink_to(BUNDLED / name)
    if weights:
        (dst / weights).symlink_to(BUNDLED / "ema.safetensors")
    return dst


def _shard(folder: Path, base: str = "model") -> dict[str, str]:
    """The bundled network as SHARDS shard files and their index, as transformers writes them."""
    tensors = load_file(BUNDLED / "ema.safetensors")
    keys = list(tensors)
    weight_map = {}
    for i in range(SHARDS):
        name = f"{base}-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = keys[i::SHARDS]
        save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / f"{base}.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def _metadata(**changes) -> dict:
    """The comfyui_bagel metadata object of the bundled model (the peer pack's schema, our configs)."""
    configs = {name: json.loads((BUNDLED / name).read_text()) for name in CONFIGS}
    ids = dict(zip(MARKERS, dataclasses.astuple(BagelTokenizer(BUNDLED).markers), strict=True))
    meta = {
        "format": METADATA_KEY, "format_version": 1, "architecture": "Bagel", "variant": "bagel-tiny",
        "dtype": "fp32", "quantization": "none", "special_token_ids": ids, "model_configs": configs,
    }  # fmt: skip
    return {**meta, **changes}


def _single_file(path: Path, metadata: dict | None = None) -> Path:
    """The bundled network as one .safetensors file, with `metadata` in its header when given."""
    header = {"format": "pt"} | ({METADATA_KEY: json.dumps(metadata)} if metadata is not None else {})
    save_file(load_file(BUNDLED / "ema.safetensors"), path, metadata=header)
    return path


def _sidecar(path: Path, meta: dict, **changes) -> Path:
    """`<path>.comfyui-bagel.json` describing `path` with `meta`, with `changes` to its fields."""
    sidecar = {
        "format": "comfyui_bagel_sidecar", "format_version": 1, "checkpoint_size": path.stat().st_size,
        "checkpoint_sha256": "not checked", "metadata": meta,
    }  # fmt: skip
    Path(f"{path}{SIDECAR_SUFFIX}").write_text(json.dumps({**sidecar, **changes}))
    return path


PARTS = ("--vae", BUNDLED / "ae.safetensors", "--tokenizer", BUNDLED)


# -- what loads, each to the bundled folder's image ---------------------------------------------------


@pytest.mark.parametrize("weights", ["model_bf16.safetensors", "model.safetensors"])
def test_fine_tune_weights_file_beside_an_invalid_config_json(tmp_path, reference, weights):
    folder = _folder(tmp_path / "m", weights=None)
    (folder / weights).symlink_to(BUNDLED / "ema.safetensors")
    (folder / "config.json").write_text('{"llm_config": {"hidden_size": 192,,}')  # as several fine-tunes ship
    assert np.array_equal(_pixels(generate(folder, tmp_path / "o.png")), reference)


def test_sharded_weights_with_an_index(tmp_path, reference):
    """The same tensors (checked equal) and config; loaded from shards they sit at other memory alignments,
    where CPU kernels may round a last bit the other way: one pixel one 8-bit level off was seen."""
    folder = _folder(tmp_path / "m", weights=None)
    _shard(folder)
    image = _pixels(generate(folder, tmp_path / "o.png")).astype(int)
    assert np.abs(image - reference).max() <= 1 and (image != reference).sum() <= 3


def test_single_file_with_configs_in_its_metadata(tmp_path, reference):
    path = _single_file(tmp_path / "bagel-tiny.safetensors", _metadata())
    assert np.array_equal(_pixels(generate(path, tmp_path / "o.png", *PARTS)), reference)
    model = bagel_model.load(path, vae=BUNDLED / "ae.safetensors", tokenizer=BUNDLED)
    assert model.source == path and model.config == read_config(BUNDLED)


def test_single_file_with_a_sidecar(tmp_path, reference):
    path = _sidecar(_single_file(tmp_path / "bagel-tiny.safetensors"), _metadata())
    assert np.array_equal(_pixels(generate(path, tmp_path / "o.png", *PARTS)), reference)


def test_single_file_without_configs_is_bagel_7b(tmp_path):
    """No metadata and no sidecar: the BAGEL-7B-MoT configs (the tables' sizes still come from the file)."""
    path = tmp_path / "bagel-7b-mot.safetensors"
    save_file({LATENT_TABLE: torch.zeros(64 * 64, 1), VIT_TABLE: torch.zeros(70 * 70, 1)}, path)
    cfg = read_config(path)
    assert (cfg.llm, cfg.vit, cfg.vae, cfg.inference) == (
        BAGEL_7B_MOT.llm,
        BAGEL_7B_MOT.vit,
        BAGEL_7B_MOT.vae,
        BAGEL_7B_MOT.inference,
    )


def test_ema_wins_over_model_and_a_file_over_its_own_index(tmp_path):
    """Official training writes model (raw) and ema (averaged) weights; the official inference reads ema."""
    folder = _folder(tmp_path / "m")
    tensors = load_file(BUNDLED / "ema.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / INDEX).write_text("{ not the index of anything")
    key = "language_model.model.embed_tokens.weight"
    assert torch.equal(bagel_model.load(folder).net.state_dict()[key], tensors[key])
    (folder / "ema.safetensors").unlink()
    assert not bagel_model.load(folder).net.state_dict()[key].any()  # model.safetensors, not its index


def test_shards_are_streamed_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Each tensor is read once, by name, from the shard the index names: never a whole file at once."""
    folder = _folder(tmp_path / "m", weights=None)
    weight_map = _shard(folder)
    reads = []
    real = safe_open

    class Recording:
        def __init__(self, path, framework):
            self.path, self.file = Path(path).name, real(path, framework=framework)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, key):
            reads.append((self.path, key))
            return self.file.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr("bagel_model.checkpoint.safe_open", Recording)
    bagel_model.load(folder)
    net_reads = [r for r in reads if r[0] != "ae.safetensors"]
    assert sorted(net_reads) == sorted((shard, key) for key, shard in weight_map.items())


# -- what is refused, naming the file and the fix -------------------------------------------------------


def _shard_gone(folder: Path, weight_map: dict[str, str]) -> str:
    shard = "model-00002-of-00003.safetensors"
    (folder / shard).unlink()
    return (
        rf"{re.escape(str(folder / INDEX))} puts \d+ tensor\(s\) .* in {shard}, which is not in .*: "
        rf"the download is incomplete; download {shard} again"
    )


def _tensor_not_in_the_index(folder: Path, weight_map: dict[str, str]) -> str:
    key, shard = next(iter(weight_map.items()))
    del weight_map[key]
    return (
        rf"{re.escape(shard)} does not hold what {INDEX} lists for it \(1 tensor\(s\) the index does not "
        rf"list there, first: {re.escape(key)}\): .* download both again"
    )


def _listed_tensor_not_in_its_shard(folder: Path, weight_map: dict[str, str]) -> str:
    weight_map["language_model.lm_head.extra"] = "model-00001-of-00003.safetensors"
    return r"1 listed tensor\(s\) missing, first: language_model\.lm_head\.extra"


def _needed_tensor_in_no_shard(folder: Path, weight_map: dict[str, str]) -> str:
    tensors = load_file(folder / "model-00001-of-00003.safetensors")
    key = next(iter(tensors))
    del tensors[key], weight_map[key]
    save_file(tensors, folder / "model-00001-of-00003.safetensors")
    return rf"{re.escape(INDEX)} does not match the model .*1 missing tensor\(s\), first: {re.escape(key)}"


@pytest.mark.parametrize(
    "damage",
    [_shard_gone, _tensor_not_in_the_index, _listed_tensor_not_in_its_shard, _needed_tensor_in_no_shard],
)
def test_shards_that_do_not_match_their_index_are_named_with_the_fix(tmp_path, damage):
    folder = _folder(tmp_path / "m", weights=None)
    weight_map = _shard(folder)
    expected = damage(folder, weight_map)
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=expected):
        bagel_model.load(folder)


@pytest.mark.parametrize(
    "text, problem",
    [("{\"weight_map\": {", "is not valid JSON"), ('{"metadata": {}}', "has no weight_map"),
     ('{"weight_map": {"a": "../b.safetensors"}}', r"maps tensors to '\.\./b\.safetensors', not a")],
)  # fmt: skip
def test_bad_index(tmp_path, text, problem):
    folder = _folder(tmp_path / "m", weights=None)
    _shard(folder)
    (folder / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=rf"{re.escape(INDEX)} {problem}.*download"):
        bagel_model.load(folder)


def test_two_indexes_and_no_known_name_are_refused(tmp_path):
    folder = _folder(tmp_path / "m", weights=None)
    _shard(folder, base="pytorch_model")
    _shard(folder, base="other")
    with pytest.raises(
        CheckpointError,
        match=r"holds 2 shard indexes \(other\.safetensors\.index\.json, "
        r"pytorch_model\.safetensors\.index\.json\) .*Keep the index \(and shards\) of this model and "
        r"move the others out of the folder",
    ):
        bagel_model.load(folder)
    (folder / "other.safetensors.index.json").unlink()
    assert bagel_model.load(folder).net is not None  # the one index left is the model


def test_folder_without_weights(tmp_path):
    folder = _folder(tmp_path / "m", weights=None)
    with pytest.raises(
        CheckpointError, match=r"is missing ema\.safetensors \(or model\.safetensors, model_bf16"
    ):
        bagel_model.load(folder)


def test_single_file_needs_an_autoencoder_and_a_tokenizer(tmp_path):
    path = _single_file(tmp_path / "b.safetensors", _metadata())
    with pytest.raises(
        CheckpointError, match=r"single-file checkpoint without the autoencoder: give FLUX's .*--vae"
    ):
        bagel_model.load(path, tokenizer=BUNDLED)
    with pytest.raises(
        CheckpointError, match=r"single-file checkpoint without a tokenizer: .*qwen25_tokenizer.*--tokenizer"
    ):
        bagel_model.load(path, vae=BUNDLED / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"autoencoder file .*nowhere\.safetensors does not exist"):
        bagel_model.load(path, vae=tmp_path / "nowhere.safetensors", tokenizer=BUNDLED)


def test_wrong_autoencoder_is_named(tmp_path):
    path = _single_file(tmp_path / "b.safetensors", _metadata())
    with pytest.raises(CheckpointError, match=r"b\.safetensors does not match .* must be FLUX's autoencoder"):
        bagel_model.load(path, vae=path, tokenizer=BUNDLED)


def test_single_file_without_configs_names_the_sidecar_to_write(tmp_path):
    """The bundled network without configs is read as BAGEL-7B-MoT: its limits exceed the file's tables;
    with 7B-sized tables, its tensors do not fit. Both errors say which configs were assumed and why."""
    path = _single_file(tmp_path / "b.safetensors")
    assumed = f"no {METADATA_KEY} metadata and no sidecar b.safetensors{SIDECAR_SUFFIX}, so BAGEL-7B-MoT's"
    parts = {"vae": BUNDLED / "ae.safetensors", "tokenizer": BUNDLED}
    with pytest.raises(CheckpointError, match=r"b\.safetensors: vae_limits\.max_size 1024 exceeds") as err:
        bagel_model.load(path, **parts)
    assert assumed in str(err.value)
    tensors = load_file(path)
    width = tensors[LATENT_TABLE].shape[1]
    tensors[LATENT_TABLE], tensors[VIT_TABLE] = torch.zeros(64 * 64, width), torch.zeros(70 * 70, width)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"b\.safetensors does not match the model .*missing") as err:
        bagel_model.load(path, **parts)
    assert assumed in str(err.value)


def test_a_folders_weights_file_given_alone_points_at_the_folder(tmp_path):
    folder = _folder(tmp_path / "m")
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(folder))} is a model folder: load the folder"
    ):
        bagel_model.load(folder / "ema.safetensors", vae=folder / "ae.safetensors", tokenizer=folder)


@pytest.mark.parametrize(
    "changes, problem",
    [({"checkpoint_size": 5}, r"describes a file of 5 bytes, but .* has \d+: the sidecar belongs to another"),
     ({"format": "something"}, "is not a sidecar of format comfyui_bagel_sidecar"),
     ({"metadata": {"format": METADATA_KEY, "format_version": 2}}, r"\(metadata\) is not comfyui_bagel")],
)  # fmt: skip
def test_bad_sidecar(tmp_path, changes, problem):
    path = _sidecar(_single_file(tmp_path / "b.safetensors"), _metadata(), **changes)
    with pytest.raises(CheckpointError, match=problem):
        read_config(path)


def test_bad_embedded_metadata(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file({"x": torch.zeros(1)}, path, metadata={METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match=rf"b\.safetensors's {METADATA_KEY} metadata is not valid JSON"):
        read_config(path)
    _single_file(path, _metadata(quantization="fp8_e4m3fn"))
    with pytest.raises(
        CheckpointError, match=r"says the weights are quantized \(fp8_e4m3fn\).*use the unquantized"
    ):
        read_config(path)
    _single_file(path, _metadata(model_configs={"llm_config.json": {"hidden_size": 192}}))
    with pytest.raises(CheckpointError, match=r"model_configs\['llm_config\.json'\] lacks required field"):
        read_config(path)


def test_tokenizer_whose_marker_ids_differ_from_the_metadata(tmp_path):
    ids = _metadata()["special_token_ids"]
    path = _single_file(tmp_path / "b.safetensors", _metadata(special_token_ids={**ids, "<|im_end|>": 7}))
    with pytest.raises(
        CheckpointError,
        match=rf"gives <\|im_end\|> the id {ids['<|im_end|>']}, but .* records 7: the tokenizer",
    ):
        bagel_model.load(path, vae=BUNDLED / "ae.safetensors", tokenizer=BUNDLED)


def test_other_files_are_refused_by_name(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"model\.gguf is not a \.safetensors file"):
        bagel_model.load(tmp_path / "model.gguf")
    with pytest.raises(CheckpointError, match=r"model file .*missing\.safetensors does not exist"):
        bagel_model.load(tmp_path / "missing.safetensors")


def test_cli_error_for_a_single_file_without_vae_is_one_line(tmp_path, capsys):
    path = _single_file(tmp_path / "b.safetensors", _metadata())
    rc = cli.main(["generate", "--model", str(path), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--vae" in err, err
