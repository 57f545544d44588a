#!/usr/bin/env python3
"""Run the OFFICIAL ByteDance-Seed BAGEL code on CPU in float32, for parity tests and benchmarks.

This file is our own harness. It contains no official code: it imports the official repository at run
time from ``--official-dir`` (default: ``$BAGEL_OFFICIAL_DIR``) and applies a few run-time patches so that
the official ``InterleaveInferencer`` runs on a CPU-only machine in float32:

1. ``flash_attn`` (CUDA only, fp16/bf16 only) is replaced by an in-memory module whose
   ``flash_attn_varlen_func`` computes exact per-sequence SDPA with GQA and bottom-right causal alignment.
2. The hard-coded ``torch.bfloat16`` casts in ``modeling/bagel/qwen2_navit.py`` and
   ``modeling/bagel/siglip_navit.py`` are lifted: those two modules are loaded from their source with
   ``torch.bfloat16`` replaced by ``torch.float32`` (patched copies in a private temporary folder,
   imported by Python's own source loader and removed at exit; the official tree is never written).
3. The VAE encodes context images with the posterior MEAN (``vae.reg.sample = False``) unless
   ``--vae-sample`` is given.
4. The initial noise of the flow sampler can be injected from a file (``infer --latents``).

See benchmarks/README_official.md for the environment, the CLI and the ``forward`` probe definition.

Subcommands::

    infer    run one task (understand, understand_think, t2i, edit, think_t2i) like the official app
    forward  dump a fixed set of raw tensors (the parity probe) to a .safetensors file
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Defaults of the reference data shipped in shared/ (used by the `forward` probe and documented there).
REFERENCE_DIR = Path("/work/shared/reference/official_tiny")
DEFAULT_PROBE_IMAGE = REFERENCE_DIR / "ref" / "input.png"

TASKS = ("understand", "understand_think", "t2i", "edit", "think_t2i")


# ---------------------------------------------------------------------------------------------------
# 1. flash-attn stand-in
# ---------------------------------------------------------------------------------------------------
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    **_unused: Any,
) -> torch.Tensor:
    """Exact CPU equivalent of ``flash_attn.flash_attn_varlen_func`` (forward, no dropout).

    ``q`` is (total_q, Hq, D), ``k``/``v`` are (total_k, Hk, D) packed over sequences delimited by the
    cumulative lengths ``cu_seqlens_q``/``cu_seqlens_k``. Each sequence attends only to its own keys.
    GQA: query head h uses KV head h // (Hq / Hk) (flash-attn's grouping). With ``causal=True`` the mask is
    aligned to the bottom right like flash-attn >= 2.1: query i of a sequence with Lq queries and Lk keys
    sees keys j <= i + Lk - Lq (so a decode step sees the whole cache). Rows that see no key give 0, as in
    flash-attn. Computation stays in the dtype received (float32 in this harness).
    """
    if dropout_p != 0.0:
        raise NotImplementedError("dropout is not supported by the CPU flash-attn stand-in")
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"GQA needs Hq % Hk == 0, got {num_q_heads} and {num_kv_heads}")
    groups = num_q_heads // num_kv_heads
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    cu_q = [int(x) for x in cu_seqlens_q.tolist()]
    cu_k = [int(x) for x in cu_seqlens_k.tolist()]
    out = q.new_zeros(q.shape[0], num_q_heads, v.shape[-1])
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        qb = q[q0:q1].transpose(0, 1)  # (Hq, Lq, D)
        kb = k[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)  # (Hq, Lk, D)
        vb = v[k0:k1].transpose(0, 1).repeat_interleave(groups, dim=0)
        mask = None
        if causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        if mask is not None and lq > lk:
            ob = ob.masked_fill(~mask.any(dim=-1)[None, :, None], 0.0)  # flash-attn: empty rows -> 0
        out[q0:q1] = ob.transpose(0, 1)
    return out


def install_flash_attn_stub() -> None:
    """Put an in-memory ``flash_attn`` module into ``sys.modules``.

    The official ``qwen2_navit.py``/``siglip_navit.py`` do ``from flash_attn import flash_attn_varlen_func``
    at import time; the real package needs CUDA. The stub gets a ``__spec__`` because transformers probes
    ``importlib.util.find_spec("flash_attn")`` (a module without a spec makes that raise); it has no
    distribution metadata, so transformers still reports flash-attn as unavailable and never uses it.
    """
    if "flash_attn" in sys.modules and getattr(sys.modules["flash_attn"], "_bagel_cpu_stub", False):
        return
    stub = types.ModuleType("flash_attn")
    stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    stub.flash_attn_varlen_func = flash_attn_varlen_func  # type: ignore[attr-defined]
    stub._bagel_cpu_stub = True  # type: ignore[attr-defined]
    sys.modules["flash_attn"] = stub


# ---------------------------------------------------------------------------------------------------
# 2. Source patches applied at import time (patched copies in a temporary folder; the official tree is
#    never written)
# ---------------------------------------------------------------------------------------------------
# module name -> list of (old, new, minimum number of occurrences expected). A patch that no longer
# matches (changed upstream file) fails loudly instead of silently running the bf16 code.
SOURCE_PATCHES: dict[str, list[tuple[str, str, int]]] = {
    # Inference casts q/k/v to bf16 before flash-attn, and (gen mode) the MLP inputs/outputs to bf16.
    # Without CUDA autocast, bf16 activations meet fp32 weights and the Linear layers fail; with them
    # the run would not be float32. Replacing the dtype keeps every other line of the official code.
    "modeling.bagel.qwen2_navit": [("torch.bfloat16", "torch.float32", 10)],
    # The ViT casts q/k/v to bf16 before flash-attn; same reason.
    "modeling.bagel.siglip_navit": [("torch.bfloat16", "torch.float32", 3)],
}


def patched_source(path: Path, patches: list[tuple[str, str, int]]) -> str:
    """The source of ``path`` with ``patches`` applied; refuses when a patch no longer matches, so an
    upstream change can never silently leave the bf16 code in place. Line numbers stay those of the
    official file (each patch replaces text within a line)."""
    source = path.read_text(encoding="utf-8")
    for old, new, min_count in patches:
        count = source.count(old)
        if count < min_count:
            raise RuntimeError(
                f"official_runner: patch {old!r}->{new!r} expected >= {min_count} matches in "
                f"{path}, found {count}; the official file changed, review the patch"
            )
        source = source.replace(old, new)
    return source


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Imports the modules listed in SOURCE_PATCHES from patched copies of their official source.

    The copies are written, with the official folder layout, into a private temporary folder that is
    removed when the process ends, and Python's ordinary source loader imports them: no source string is
    ever executed by hand, and the official tree is never written to. A fresh folder per process (and
    ``sys.dont_write_bytecode``) means a stale .pyc of an unpatched file can never be picked up.
    """

    def __init__(self, official_dir: Path) -> None:
        self.official_dir = official_dir
        self._folder = tempfile.TemporaryDirectory(prefix="bagel-official-patched-")
        self.folder = Path(self._folder.name)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patches = SOURCE_PATCHES.get(fullname)
        if patches is None:
            return None
        relative = Path(*fullname.split(".")).with_suffix(".py")
        original = self.official_dir / relative
        if not original.is_file():
            return None
        copy = self.folder / relative
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(patched_source(original, patches), encoding="utf-8")
        return importlib.util.spec_from_file_location(fullname, copy)

    def imported(self, fullname: str) -> bool:
        """Whether the loaded module ``fullname`` came from this finder's patched copy."""
        module = sys.modules.get(fullname)
        origin = getattr(module, "__file__", None)
        return origin is not None and Path(origin).is_relative_to(self.folder)


def _patching_finder(official_dir: Path) -> _PatchingFinder:
    """The finder for ``official_dir`` on ``sys.meta_path``, installed first in line if not there yet."""
    for finder in sys.meta_path:
        if isinstance(finder, _PatchingFinder) and finder.official_dir == official_dir:
            return finder
    finder = _PatchingFinder(official_dir)
    sys.meta_path.insert(0, finder)
    return finder


@dataclass
class Official:
    """Handles on the official modules the harness uses."""

    bagel: types.ModuleType  # modeling.bagel
    qwen2: types.ModuleType  # modeling.qwen2 (Qwen2Tokenizer)
    autoencoder: types.ModuleType  # modeling.autoencoder
    data_utils: types.ModuleType  # data.data_utils
    transforms: types.ModuleType  # data.transforms
    inferencer: types.ModuleType  # inferencer


def import_official(official_dir: Path) -> Official:
    """Import the official repository from ``official_dir`` with the CPU/fp32 patches in place."""
    official_dir = official_dir.resolve()
    if not (official_dir / "inferencer.py").is_file():
        raise SystemExit(f"--official-dir {official_dir} does not look like the official BAGEL repo")
    # Never write __pycache__ into the (read-only, not ours) official tree.
    sys.dont_write_bytecode = True
    install_flash_attn_stub()
    finder = _patching_finder(official_dir)
    if str(official_dir) not in sys.path:
        sys.path.insert(0, str(official_dir))
    # Note: qwen2_navit wraps flex_attention in torch.compile at import. torch.compile is lazy and the
    # inference path never calls flex_attention (training only), so this is left untouched.
    import data.data_utils as data_utils
    import data.transforms as transforms  # imports cv2: install opencv-python-headless
    import inferencer
    import modeling.autoencoder as autoencoder
    import modeling.bagel as bagel
    import modeling.qwen2 as qwen2

    for name in SOURCE_PATCHES:
        if not finder.imported(name):
            raise RuntimeError(f"{name} was imported before the patches were installed")
    return Official(bagel, qwen2, autoencoder, data_utils, transforms, inferencer)


# ---------------------------------------------------------------------------------------------------
# 3. Building the official model exactly as app.py / inference.ipynb do (float32, CPU)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Bundle:
    official: Official
    model: Any  # official Bagel
    vae: Any  # official AutoEncoder
    tokenizer: Any  # official Qwen2Tokenizer
    new_token_ids: dict[str, int]
    vae_transform: Any  # official ImageTransform(1024, 512, 16)
    vit_transform: Any  # official ImageTransform(980, 224, 14)
    inferencer: Any  # official InterleaveInferencer


def _load_safetensors_fp32(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}


def official_config(ob, llm_config, vit_config, vae_config, **tables):
    """app.py's BagelConfig around these sub-configs (`tables`: the two position-table sides)."""
    return ob.BagelConfig(
        visual_gen=True,
        visual_und=True,
        llm_config=llm_config,
        vit_config=vit_config,
        vae_config=vae_config,
        connector_act="gelu_pytorch_tanh",
        latent_patch_size=2,
        **tables,
    )


APP_TABLES = {"vit_max_num_patch_per_side": 70, "max_latent_size": 64}  # app.py's position-table sides


def build_official(
    model_dir: Path, official: Official, vae_sample: bool = False, tables: dict = APP_TABLES
) -> Bundle:
    """Build model, VAE, tokenizer, transforms and InterleaveInferencer from an official model folder."""
    from accelerate import init_empty_weights

    ob = official.bagel
    llm_config = ob.Qwen2Config.from_json_file(str(model_dir / "llm_config.json"))
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"

    vit_config = ob.SiglipVisionConfig.from_json_file(str(model_dir / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1

    ae_mod = official.autoencoder
    ae_config_path = model_dir / "ae_config.json"
    if ae_config_path.is_file():
        # Small test checkpoints describe their (non-FLUX-sized) AE with the AutoEncoderParams fields;
        # the official load_ae hard-codes the FLUX sizes, so build the official AutoEncoder directly.
        vae_config = ae_mod.AutoEncoderParams(**json.loads(ae_config_path.read_text()))
        vae_model = ae_mod.AutoEncoder(vae_config)
        missing, unexpected = vae_model.load_state_dict(
            _load_safetensors_fp32(model_dir / "ae.safetensors"), strict=False, assign=True
        )
        ae_mod.print_load_warning(missing, unexpected)
    else:
        vae_model, vae_config = ae_mod.load_ae(local_path=str(model_dir / "ae.safetensors"))
    # The official DiagonalGaussian samples the posterior (consumes the RNG) by default; the reference
    # outputs used the posterior mean, which is deterministic.
    vae_model.reg.sample = vae_sample
    vae_model = vae_model.to(torch.float32).eval()

    config = official_config(ob, llm_config, vit_config, vae_config, **tables)
    # Same as app.py: construct on the meta device, convert the ViT patch conv to a Linear, then load
    # ema.safetensors (app.py uses accelerate's load_checkpoint_and_dispatch in bf16; we assign fp32).
    with init_empty_weights():
        language_model = ob.Qwen2ForCausalLM(llm_config)
        vit_model = ob.SiglipVisionModel(vit_config)
        model = ob.Bagel(language_model, vit_model, config)
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=True)
    state = _load_safetensors_fp32(model_dir / "ema.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"unexpected keys in ema.safetensors: {unexpected[:10]}")
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise RuntimeError(
            f"parameters not loaded from ema.safetensors: {still_meta[:10]} (missing={missing[:10]})"
        )
    model = model.to(torch.float32).eval()

    tokenizer = official.qwen2.Qwen2Tokenizer.from_pretrained(str(model_dir))
    tokenizer, new_token_ids, _ = official.data_utils.add_special_tokens(tokenizer)

    vae_transform = official.transforms.ImageTransform(1024, 512, 16)
    vit_transform = official.transforms.ImageTransform(980, 224, 14)
    inferencer = official.inferencer.InterleaveInferencer(
        model=model,
        vae_model=vae_model,
        tokenizer=tokenizer,
        vae_transform=vae_transform,
        vit_transform=vit_transform,
        new_token_ids=new_token_ids,
    )
    return Bundle(
        official, model, vae_model, tokenizer, new_token_ids, vae_transform, vit_transform, inferencer
    )


# ---------------------------------------------------------------------------------------------------
# 4. Noise injection and helpers
# ---------------------------------------------------------------------------------------------------
def patchify_latent(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[C, 2h, 2w] latent -> packed (h*w, p*p*C) tokens, the layout of the official sampler's noise
    (inverse of InterleaveInferencer.decode_image): view (C,h,p,w,p) -> (h,w,p,p,C) -> (h*w, p*p*C)."""
    c, hh, ww = latent.shape
    h, w = hh // patch, ww // patch
    x = latent[:, : h * patch, : w * patch].reshape(c, h, patch, w, patch)
    return torch.einsum("chpwq->hwpqc", x).reshape(h * w, patch * patch * c).contiguous()


@contextmanager
def injected_noise(model: Any, noise: torch.Tensor | None) -> Iterator[None]:
    """Replace the initial noise that Bagel.prepare_vae_latent draws with torch.randn by ``noise``
    (already packed (h*w, 64)). The original still runs (and still consumes the RNG) so everything
    else it returns is the official value."""
    if noise is None:
        yield
        return
    original: Callable[..., dict[str, Any]] = model.prepare_vae_latent
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        out = original(*args, **kwargs)
        drawn = out["packed_init_noises"]
        if drawn.shape != noise.shape:
            raise ValueError(
                f"latents give noise {tuple(noise.shape)} but the sampler needs {tuple(drawn.shape)}"
            )
        out["packed_init_noises"] = noise.to(drawn.dtype).clone()
        calls["n"] += 1
        return out

    model.prepare_vae_latent = wrapper  # instance attribute shadows the method
    try:
        yield
        if calls["n"] != 1:
            raise RuntimeError(f"prepare_vae_latent was called {calls['n']} times, expected once")
    finally:
        del model.prepare_vae_latent


def load_image(path: Path, official: Official) -> Any:
    from PIL import Image

    return official.data_utils.pil_img2rgb(Image.open(path))


# ---------------------------------------------------------------------------------------------------
# 5. `infer`
# ---------------------------------------------------------------------------------------------------
def run_infer(args: argparse.Namespace, bundle: Bundle) -> dict[str, Any]:
    task: str = args.task
    understanding = task in ("understand", "understand_think")
    think = task in ("understand_think", "think_t2i")
    needs_image = task in ("understand", "understand_think", "edit")
    if needs_image and args.image is None:
        raise SystemExit(f"--image is required for task {task}")

    # Input order as in app.py / InterleaveInferencer.__call__: image first, then text.
    inputs: list[Any] = []
    if needs_image:
        inputs.append(load_image(Path(args.image), bundle.official))
    inputs.append(args.prompt)

    # generate_text runs at most max_length steps and the first step only feeds <|im_start|>, so
    # max_length = N + 1 yields at most N new tokens (app.py passes its max_new_tokens as max_length).
    max_length = args.max_new_tokens + 1
    hyper: dict[str, Any] = dict(
        think=think,
        understanding_output=understanding,
        max_think_token_n=max_length,
        do_sample=args.do_sample,
        text_temperature=args.temperature,
    )
    noise = None
    if not understanding:
        defaults = _GEN_DEFAULTS["edit" if task == "edit" else "t2i"]
        cfg_interval = args.cfg_interval if args.cfg_interval is not None else defaults["cfg_interval"]
        hyper.update(
            cfg_text_scale=args.cfg_text if args.cfg_text is not None else defaults["cfg_text"],
            cfg_img_scale=args.cfg_img if args.cfg_img is not None else defaults["cfg_img"],
            cfg_interval=[float(cfg_interval[0]), float(cfg_interval[1])],
            timestep_shift=args.shift,
            num_timesteps=args.steps,
            cfg_renorm_min=args.renorm_min,
            cfg_renorm_type=args.renorm_type if args.renorm_type is not None else defaults["renorm_type"],
        )
        if task != "edit":  # edit: the inferencer takes the output size from the resized input image
            hyper["image_shapes"] = (args.height, args.width)
        if args.latents is not None:
            from safetensors.torch import load_file

            latents = load_file(str(args.latents))["latents"].to(torch.float32)
            noise = patchify_latent(latents, bundle.model.latent_patch_size)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with injected_noise(bundle.model, noise), torch.no_grad():
        outputs = bundle.inferencer.interleave_inference(inputs, **hyper)
    wall = time.perf_counter() - t0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [o for o in outputs if isinstance(o, str)]
    images = [o for o in outputs if not isinstance(o, str)]
    result: dict[str, Any] = {"task": task, "prompt": args.prompt, "wall_s": wall}
    if understanding:
        result["text"] = texts[0] if texts else None
    else:
        if think:
            result["thought"] = texts[0] if texts else None
        if images:
            images[0].save(out_dir / "image.png")
            result["image"] = "image.png"
            result["height"], result["width"] = images[0].size[1], images[0].size[0]
    result["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hyper.items()} | {
        "seed": args.seed,
        "latents": str(args.latents) if args.latents else None,
        "vae_sample": args.vae_sample,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


# Official per-task defaults (app.py): T2I cfg_img is the interleave_inference default 1.5 in the app
# (text_to_image does not pass it); the notebook uses 1.0. Pass --cfg-img explicitly to pick one.
_GEN_DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {"cfg_text": 4.0, "cfg_img": 1.5, "cfg_interval": (0.4, 1.0), "renorm_type": "global"},
    "edit": {"cfg_text": 4.0, "cfg_img": 2.0, "cfg_interval": (0.0, 1.0), "renorm_type": "text_channel"},
}


# ---------------------------------------------------------------------------------------------------
# 6. `forward`: the parity probe (definition in README_official.md)
# ---------------------------------------------------------------------------------------------------
PROBE_UND_PROMPT = "describe the image."
PROBE_GEN_PROMPT = "a red circle at the top left"
PROBE_GEN_HW = (64, 64)
PROBE_T = 0.7
PROBE_SEED = 0
PROBE_VAE_HW = (64, 64)


@contextmanager
def _capture_llm_inputs(model: Any, sink: list[dict[str, Any]]) -> Iterator[None]:
    """Record the keyword arguments of every language_model.forward_inference call."""
    lm = model.language_model
    original = lm.forward_inference

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sink.append(kwargs)
        return original(*args, **kwargs)

    lm.forward_inference = wrapper
    try:
        yield
    finally:
        del lm.forward_inference


def run_forward(args: argparse.Namespace, bundle: Bundle) -> dict[str, torch.Tensor]:
    model, inf = bundle.model, bundle.inferencer
    tensors: dict[str, torch.Tensor] = {}
    image = load_image(Path(args.image), bundle.official)

    with torch.no_grad():
        # (a) understanding: [ViT(image), text] then the first decode step.
        resized = bundle.vae_transform.resize_transform(image)  # the inferencer's VAE-rule pre-resize
        vit_in = model.prepare_vit_images(
            curr_kvlens=[0],
            curr_rope=[0],
            images=[resized],
            transforms=bundle.vit_transform,
            new_token_ids=bundle.new_token_ids,
        )[0]
        tensors["vit_pixels"] = vit_in["packed_vit_tokens"]
        tensors["vit_position_ids"] = vit_in["packed_vit_position_ids"]
        ctx = inf.init_gen_context()
        calls: list[dict[str, Any]] = []
        with _capture_llm_inputs(model, calls):
            ctx = inf.update_context_image(resized, ctx, vae=False, vit=True)
        seq = calls[0]["packed_query_sequence"]
        tensors["vit_embeds"] = seq[1:-1].clone()  # drop <|vision_start|>, <|vision_end|>
        ctx = inf.update_context_text(PROBE_UND_PROMPT, ctx)
        tensors["und_prompt_ids"] = torch.tensor(
            [bundle.new_token_ids["bos_token_id"]]
            + bundle.tokenizer.encode(PROBE_UND_PROMPT)
            + [bundle.new_token_ids["eos_token_id"]],
            dtype=torch.int64,
        )
        logits: list[torch.Tensor] = []
        hook = model.language_model.lm_head.register_forward_hook(
            lambda m, i, o: logits.append(o.detach().clone())
        )
        try:
            inf.gen_text(ctx, max_length=1, do_sample=False)  # one step: <|im_start|> at the context rope
        finally:
            hook.remove()
        tensors["und_logits"] = logits[0][0]
        tensors["und_context_len"] = torch.tensor([ctx["kv_lens"][0], ctx["ropes"][0]], dtype=torch.int64)

        # (b) generation: one velocity evaluation (no CFG) against [text] and against an empty context.
        h, w = PROBE_GEN_HW
        torch.manual_seed(PROBE_SEED)
        x_t = torch.randn(
            (h // model.latent_downsample) * (w // model.latent_downsample),
            model.patch_latent_dim,
            dtype=torch.float32,
        )
        tensors["x_t"] = x_t
        model.language_model.model.enable_taylorseer = (
            False  # generate_image sets this; _forward_flow reads it
        )
        gen_ctx = inf.update_context_text(PROBE_GEN_PROMPT, inf.init_gen_context())
        tensors["gen_prompt_ids"] = torch.tensor(
            [bundle.new_token_ids["bos_token_id"]]
            + bundle.tokenizer.encode(PROBE_GEN_PROMPT)
            + [bundle.new_token_ids["eos_token_id"]],
            dtype=torch.int64,
        )
        for name, c in (("gen_velocity", gen_ctx), ("gen_velocity_empty", inf.init_gen_context())):
            gi = model.prepare_vae_latent(
                curr_kvlens=c["kv_lens"],
                curr_rope=c["ropes"],
                image_sizes=[PROBE_GEN_HW],
                new_token_ids=bundle.new_token_ids,
            )
            gi.pop("packed_init_noises")
            timestep = torch.tensor([PROBE_T] * x_t.shape[0])
            v = model._forward_flow(
                x_t=x_t,
                timestep=timestep,
                past_key_values=c["past_key_values"],
                cfg_text_scale=1.0,
                cfg_img_scale=1.0,
                **gi,
            )
            tensors[name] = v

        # (c) VAE round trip at 64x64.
        from PIL import Image

        vae_img = image.resize((PROBE_VAE_HW[1], PROBE_VAE_HW[0]), resample=Image.BICUBIC)
        x = bundle.vae_transform.to_tensor_transform(vae_img)
        x = bundle.vae_transform.normalize_transform(x)[None]
        tensors["vae_input"] = x
        lat = bundle.vae.encode(x)
        tensors["vae_latent"] = lat
        tensors["vae_decoded"] = bundle.vae.decode(lat)

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    from safetensors.torch import save_file

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "probe": "bagel-official-forward-v1",
        "und_prompt": PROBE_UND_PROMPT,
        "gen_prompt": PROBE_GEN_PROMPT,
        "gen_hw": json.dumps(PROBE_GEN_HW),
        "t": str(PROBE_T),
        "seed": str(PROBE_SEED),
        "image": str(args.image),
        "vae_sample": str(args.vae_sample),
    }
    save_file(tensors, str(out), metadata=meta)
    return tensors


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--official-dir",
        type=Path,
        default=os.environ.get("BAGEL_OFFICIAL_DIR"),
        help="checkout of ByteDance-Seed/Bagel (default: $BAGEL_OFFICIAL_DIR)",
    )
    common.add_argument("--model", type=Path, required=True, help="official model folder")
    common.add_argument("--out", type=Path, required=True)
    common.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    common.add_argument(
        "--vae-sample",
        action="store_true",
        help="keep the official posterior SAMPLING in vae.encode (default: posterior mean)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("infer", parents=[common], help="run one task through InterleaveInferencer")
    pi.add_argument("--task", choices=TASKS, required=True)
    pi.add_argument("--image", type=Path, default=None)
    pi.add_argument("--prompt", required=True)
    pi.add_argument(
        "--latents",
        type=Path,
        default=None,
        help="safetensors with `latents` [16, H/8, W/8]: the sampler's initial noise",
    )
    pi.add_argument("--height", type=int, default=1024)
    pi.add_argument("--width", type=int, default=1024)
    pi.add_argument("--steps", type=int, default=50, help="num_timesteps (steps-1 evaluations)")
    pi.add_argument("--cfg-text", type=float, default=None, help="default 4.0")
    pi.add_argument("--cfg-img", type=float, default=None, help="default: t2i 1.5 (app), edit 2.0")
    pi.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("A", "B"),
        help="default: t2i 0.4 1.0, edit 0.0 1.0",
    )
    pi.add_argument("--shift", type=float, default=3.0)
    pi.add_argument(
        "--renorm-type",
        choices=("global", "channel", "text_channel"),
        default=None,
        help="default: t2i global, edit text_channel",
    )
    pi.add_argument("--renorm-min", type=float, default=0.0)
    pi.add_argument(
        "--max-new-tokens",
        type=int,
        default=1000,
        help="answer / thought budget; passed as max_length = N + 1",
    )
    pi.add_argument("--do-sample", action="store_true")
    pi.add_argument("--temperature", type=float, default=0.3)
    pi.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the call")

    pf = sub.add_parser("forward", parents=[common], help="dump the parity-probe tensors")
    pf.add_argument("--image", type=Path, default=DEFAULT_PROBE_IMAGE)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.official_dir is None:
        raise SystemExit("give --official-dir or set BAGEL_OFFICIAL_DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    official = import_official(Path(args.official_dir))
    t0 = time.perf_counter()
    bundle = build_official(Path(args.model), official, vae_sample=args.vae_sample)
    load_s = time.perf_counter() - t0
    if args.cmd == "infer":
        result = run_infer(args, bundle)
        summary = {k: v for k, v in result.items() if k != "settings"}
        print(json.dumps(summary | {"load_s": load_s}, ensure_ascii=False))
    else:
        tensors = run_forward(args, bundle)
        print(json.dumps({k: list(v.shape) for k, v in tensors.items()} | {"load_s": load_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
