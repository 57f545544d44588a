#!/usr/bin/env python3
"""Regenerate tests/fixtures/official_tiny: a tiny random checkpoint written by the OFFICIAL BAGEL classes,
and the official `InterleaveInferencer`'s outputs on it, so that a fresh clone runs the parity tests.

The fixture lives in git, so its model is tinier than the shared reference's and its image limits are
smaller (VAE 256/64/16, ViT 224/56/14: the two sin-cos tables are 16x16, and the edit runs at 192x144). The
official code takes those limits as arguments (`ImageTransform`, `BagelConfig`); our loader reads them from
`bagel_inference.json` and the tables' shapes. Weights are stored in bfloat16 like the released
`ema.safetensors`; both sides compute in float32 on them.

Run it in the official environment (benchmarks/README_official.md), from the repository root:

    /work/scratch/official_env/venv/bin/python benchmarks/make_parity_fixture.py \
        --official-dir /path/to/Bagel --official-commit SHA [--out tests/fixtures/official_tiny]

It imports the official code through `official_runner` (CPU/fp32 patches, noise injection, the `infer`
task runner) and writes the model, the official outputs (`ref/`) and a README naming the official commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_runner, beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bagel_model, for the tokenizer and init

import official_runner as runner  # noqa: E402

from bagel_model.tiny import randomize, write_tokenizer  # noqa: E402

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official_tiny"
SEED = 0
STORAGE_DTYPE = torch.bfloat16  # the released ema.safetensors' dtype; halves the fixture
INPUT_SIZE = (200, 150)  # W x H; the VAE rule (256, 64, 16) makes it 192x144 (12.5 rounds down)

LLM_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
}
VIT_CONFIG = {  # three layers listed, two used (the official code drops the last)
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": 224,  # 16 x 16 learned positions, the ViT limit's grid
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
    "model_type": "siglip_vision_model",
}
# The FLUX architecture at its smallest with the released 8x downsample: its GroupNorms need 32 channels, and
# with no encoder blocks per level the decoder still has one (num_res_blocks + 1).
AE_CONFIG = {
    "resolution": 256,
    "in_channels": 3,
    "downsample": 8,
    "out_ch": 3,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 0,
}
# Our file (bagel_model.config.InferenceConfig); the official side gets the same limits as ImageTransforms.
INFERENCE = {
    "vae_limits": {"max_size": 256, "min_size": 64, "stride": 16},
    "vit_limits": {"max_size": 224, "min_size": 56, "stride": 14},
    "default_height": 64,
    "default_width": 64,
}
TABLES = {  # sides of the two sin-cos tables, the limits' largest image in tokens
    "max_latent_size": INFERENCE["vae_limits"]["max_size"] // 16,
    "vit_max_num_patch_per_side": INFERENCE["vit_limits"]["max_size"] // VIT_CONFIG["patch_size"],
}

UND_PROMPT = "describe the image."
GEN_PROMPT = "a red circle at the top left, a blue square at the center"
GEN_SETTINGS = ["--steps", "10", "--cfg-text", "4", "--shift", "3", "--renorm-min", "0"]
T2I_SETTINGS = ["--cfg-img", "1", "--cfg-interval", "0.4", "1", "--renorm-type", "global"]
# task -> (prompt, uses the input image, output size (H, W) or None, extra `infer` arguments)
CALLS: dict[str, tuple[str, bool, tuple[int, int] | None, list[str]]] = {
    "understand": (UND_PROMPT, True, None, ["--max-new-tokens", "11"]),
    "understand_think": (UND_PROMPT, True, None, ["--max-new-tokens", "11"]),
    "t2i": (GEN_PROMPT, False, (96, 128), GEN_SETTINGS + T2I_SETTINGS),
    "edit": (
        "make the circle green",
        True,
        None,
        GEN_SETTINGS + ["--cfg-img", "2", "--cfg-interval", "0", "1", "--renorm-type", "text_channel"],
    ),
    "think_t2i": (GEN_PROMPT, False, (64, 64), GEN_SETTINGS + T2I_SETTINGS + ["--max-new-tokens", "9"]),
}


def input_image() -> Image.Image:
    """The context image: a red circle at the top left and a blue square at the center."""
    im = Image.new("RGB", INPUT_SIZE, "white")
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 10, 70, 70), fill="red")
    draw.rectangle((75, 50, 125, 100), fill="blue")
    return im


def official_modules(official: runner.Official, vocab_size: int) -> tuple[Any, Any]:
    """The official Bagel (ViT patch embedding already a Linear, as app.py loads it) and AutoEncoder, built
    for real on CPU with the sizes above and seeded random weights; the sin-cos tables keep the official
    values."""
    ob = official.bagel
    llm_config = ob.Qwen2Config(**(LLM_CONFIG | {"vocab_size": vocab_size}))
    llm_config.qk_norm = True
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = ob.SiglipVisionConfig(**VIT_CONFIG)
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1
    vae_config = official.autoencoder.AutoEncoderParams(**AE_CONFIG)
    config = runner.official_config(ob, llm_config, vit_config, vae_config, **TABLES)
    model = ob.Bagel(ob.Qwen2ForCausalLM(llm_config), ob.SiglipVisionModel(vit_config), config)
    model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config)
    vae = official.autoencoder.AutoEncoder(vae_config)
    generator = torch.Generator().manual_seed(SEED)
    randomize(model, generator)
    randomize(vae, generator)
    model.latent_pos_embed._init_weights()
    model.vit_pos_embed._init_weights()
    return model, vae


def write_model(folder: Path, official: runner.Official) -> None:
    """The official model folder: configs, tokenizer, ema.safetensors and ae.safetensors (bfloat16)."""
    folder.mkdir(parents=True)
    write_tokenizer(folder, vocab_size=312)
    vocab_size = len(json.loads((folder / "vocab.json").read_text()))  # the markers are in it
    model, vae = official_modules(official, vocab_size)
    for name, data in (
        ("llm_config.json", LLM_CONFIG | {"vocab_size": vocab_size}),
        ("vit_config.json", VIT_CONFIG),
        ("ae_config.json", AE_CONFIG),
        ("bagel_inference.json", INFERENCE),
    ):
        (folder / name).write_text(json.dumps(data, indent=2) + "\n")
    for name, module in (("ema.safetensors", model), ("ae.safetensors", vae)):
        state = {k: v.detach().to(STORAGE_DTYPE).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / name))


def build_bundle(model_dir: Path, official: runner.Official) -> runner.Bundle:
    """`official_runner.build_official` with this fixture's table sides and image limits."""
    bundle = runner.build_official(model_dir, official, tables=TABLES)
    transforms = official.transforms
    bundle.vae_transform = transforms.ImageTransform(*INFERENCE["vae_limits"].values())
    bundle.vit_transform = transforms.ImageTransform(*INFERENCE["vit_limits"].values())
    bundle.inferencer.vae_transform = bundle.vae_transform
    bundle.inferencer.vit_transform = bundle.vit_transform
    return bundle


def write_latents(path: Path, height: int, width: int, generator: torch.Generator) -> None:
    """Initial noise `[16, H/8, W/8]` (the latent layout the official decoder unpatchifies)."""
    latents = torch.randn(AE_CONFIG["z_channels"], height // 8, width // 8, generator=generator)
    save_file({"latents": latents}, str(path))


def run_calls(official_dir: Path, model_dir: Path, ref: Path, official: runner.Official) -> dict[str, Any]:
    """Every call of CALLS through the official inferencer; images and noise go to `ref`."""
    bundle = build_bundle(model_dir, official)
    image = input_image()
    image.save(ref / "input.png")
    edit_size = bundle.vae_transform.resize_transform(image).size  # (W, H) after the official resize
    generator = torch.Generator().manual_seed(SEED + 1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, (prompt, with_image, size, extra) in CALLS.items():
            argv = ["infer", "--task", task, "--official-dir", str(official_dir), "--model", str(model_dir)]
            argv += ["--prompt", prompt, "--out", str(Path(tmp) / task), *extra]
            if with_image:
                argv += ["--image", str(ref / "input.png")]
            if task not in ("understand", "understand_think"):
                height, width = size or edit_size[::-1]
                write_latents(ref / f"{task}_latents.safetensors", height, width, generator)
                argv += ["--height", str(height), "--width", str(width)]
                argv += ["--latents", str(ref / f"{task}_latents.safetensors")]
            out = runner.run_infer(runner._parser().parse_args(argv), bundle)
            results[task] = summary(out)
            if "image" in out:
                shutil.copy(Path(tmp) / task / "image.png", ref / f"{task}.png")
    return results


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """A call's entry of results.json, in the shared reference's keys."""
    entry = {"prompt": out["prompt"]}
    entry |= {k: out[k] for k in ("text", "thought", "height", "width") if out.get(k) is not None}
    s = out["settings"]
    if "num_timesteps" in s:
        entry |= {k: s[k] for k in ("cfg_text_scale", "cfg_img_scale", "cfg_interval", "timestep_shift")}
        entry |= {"num_timesteps": s["num_timesteps"], "cfg_renorm_min": s["cfg_renorm_min"]}
        entry["renorm"] = s["cfg_renorm_type"]
    return entry


def official_commit(official_dir: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "-C", str(official_dir), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(
            f"{official_dir} is not a git checkout: give its commit with --official-commit"
        ) from None


README = """# A tiny checkpoint in the official format, with the official code's outputs on it

Data for tests/test_parity.py (no code), written by `benchmarks/make_parity_fixture.py`: regenerate it
with that script, do not edit it by hand.

Official code: ByteDance-Seed/Bagel at {commit}.
Made with: {versions}.

`model/` is a random BAGEL checkpoint written by the official BAGEL classes with seeded random weights
(seed {seed}), stored in bfloat16 like the released `ema.safetensors`: LLM hidden 32, 2 MoT layers,
4 heads / 2 KV heads; SigLIP hidden 16, 2 layers used of 3 in `vit_config.json`; a FLUX-architecture AE
(32 channels, 8x downsample, no encoder blocks per level) described by `ae_config.json`; a {vocab}-token
byte-level BPE tokenizer with the four BAGEL markers. Its image limits (VAE 256/64/16, ViT 224/56/14, in
our `bagel_inference.json`) size the two sin-cos tables at 16x16, so the whole fixture stays small.

`ref/` holds what the official `InterleaveInferencer` produced on it through `benchmarks/official_runner.py`
(float32 on CPU, flash-attn replaced by an exact SDPA equivalent, bf16 casts lifted, VAE posterior mean),
with the official `ImageTransform`s built from the same limits; the initial noise is given in
`*_latents.safetensors` (`latents`, `[16, H/8, W/8]`). `results.json` lists every call's prompt, settings
and output:
- `understand`, `understand_think`: input.png + "{und}", greedy, at most 11 new tokens;
- `t2i`: 96x128 text-to-image;
- `edit`: input.png, {edit_w}x{edit_h} after the official VAE resize, "make the circle green";
- `think_t2i`: 64x64 after a greedy thought of at most 9 tokens.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-dir", type=Path, required=True, help="checkout of ByteDance-Seed/Bagel")
    p.add_argument("--official-commit", default=None, help="its commit, when it is not a git checkout")
    p.add_argument("--out", type=Path, default=FIXTURE_DIR, help=f"default {FIXTURE_DIR}")
    args = p.parse_args(argv)
    commit = official_commit(args.official_dir, args.official_commit)
    torch.set_num_threads(1)
    official = runner.import_official(args.official_dir)
    if args.out.exists():
        shutil.rmtree(args.out)
    ref = args.out / "ref"
    ref.mkdir(parents=True)
    write_model(args.out / "model", official)
    results = run_calls(args.official_dir, args.out / "model", ref, official)
    (ref / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    vocab = json.loads((args.out / "model" / "llm_config.json").read_text())["vocab_size"]
    readme = README.format(
        commit=commit,
        seed=SEED,
        vocab=vocab,
        und=UND_PROMPT,
        edit_w=results["edit"]["width"],
        edit_h=results["edit"]["height"],
        versions=versions,
    )
    (args.out / "README.md").write_text(readme)
    print(json.dumps({k: v.get("text", v.get("thought", v.get("width"))) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
