"""The recipe of the bundled tiny model: `python -m bagel_model.training.recipe --out DIR [--minutes M]`.

Steps, each logged to `DIR/train.log` and resumable by re-running the same command:
1. the tokenizer: a byte-level BPE trained on shapes-world text (`vocab.py`) -> `DIR/tokenizer/`;
2. the autoencoder: trained on shapes images, then frozen (`autoencoder.py`) -> `DIR/ae/`;
3. the BAGEL network, trained from scratch (or from `--init DIR`, an earlier run's model) on the task
   mix below (`data.py`, `losses.py`, `trainer.py`), checkpointed to `DIR/checkpoints/` every few minutes;
4. the model: the final EMA weights in the official folder layout -> `DIR/model/`, then a held-out
   capability check through the real inference tasks (`evaluate.py`) -> `DIR/eval.json`.

The model, data mix and budgets are chosen for a 2-core CPU and ~90 minutes in all (the numbers and their
reasons are in the constants below). Nothing here is a library API: it composes the training modules.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import load
from ..config import BagelConfig, ImageLimits, InferenceConfig, LLMConfig, VAEConfig, ViTConfig
from ..layers.vae import AutoEncoder
from ..model import Bagel
from ..tokenizer import BagelTokenizer
from .autoencoder import SIZE, TINY_AE, AESettings, reconstruction_check, train_autoencoder
from .data import ImageBank, PackSettings, PlanQueue, PlanSettings, pack, plan_stream
from .evaluate import evaluate
from .trainer import Trainer, TrainSettings, init_weights, latest_checkpoint
from .vocab import VOCAB_SIZE, write_tokenizer


def bundled_config(vae: VAEConfig = TINY_AE, vocab_size: int = VOCAB_SIZE) -> BagelConfig:
    """The bundled model's architecture.

    - Images are 48x48 (`autoencoder.SIZE`), and context pictures are resized to that: 6x6 latents, 3x3 = 9
      tokens with the 2x2 latent patch, one token per grid cell. An edit then changes one token and copies
      the rest, a move or a view shift moves tokens by one position. At 64 px (4x4 tokens, a cell spanning
      1.33 tokens) this network navigated at 0.07 after 27,556 steps; 14,526 more at 48 px made it 0.80
      (the bundled model card). The latent table covers 16 tokens per side (256 px).
    - The ViT uses 16-pixel patches on the same 48x48: 3x3 = 9 tokens, one per grid cell of the world,
      instead of the 25 of patch 14 at 70 px; fewer tokens and each one sees exactly one cell.
    - The decoder is 192 wide, 4 layers, 6 heads of 32 (3 KV heads), MLP 512: big enough for the world,
      small enough for ~2 optimizer steps a second on two cores.
    """
    return BagelConfig(
        llm=LLMConfig(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=3,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
        ),
        vit=ViTConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            patch_size=16,
            image_size=48,
        ),
        vae=vae,
        inference=InferenceConfig(
            vae_limits=ImageLimits(max_size=SIZE, min_size=SIZE, stride=16),
            vit_limits=ImageLimits(max_size=SIZE, min_size=SIZE, stride=16),
            default_height=SIZE,
            default_width=SIZE,
        ),
        max_latent_size=16,
        vit_max_num_patch_per_side=3,
    )


# Plans per task. Understanding plans are short (~25 tokens) and its ViT learns from nothing else, so they
# are drawn often; thinking's text is learnt in a few hundred steps, and its image is one-object t2i. Edits,
# motion and navigation learned slowest (their losses still fell when budgets ended), so they get the most.
# Chains (text-to-image, then 2-3 edits in one context) teach what the edit-chain workflow asks: a third
# edit of single-edit training redrew the first picture's object. Run 5 (recolors of one of two objects of
# a shape) took 0.02 each from motion and navigation, both at 0.99, for edits and chains.
MIX = {
    "t2i": 0.10,
    "understand": 0.20,
    "edit": 0.24,
    "chain": 0.10,
    "think": 0.03,
    "motion": 0.17,
    "navigate": 0.16,
}


@dataclass(frozen=True)
class Recipe:
    minutes: float = 90.0
    seed: int = 0
    ae_fraction: float = 0.25  # cap for the AE's 1500 steps (~4 min on idle cores; a busy CPU needs more)
    eval_minutes: float = 4.0  # reserved at the end for the capability check
    eval_n: int = 24  # cases per capability (0: no check)
    cfg: BagelConfig = field(default_factory=bundled_config)
    mix: dict = field(default_factory=lambda: dict(MIX))
    plans: PlanSettings = PlanSettings()
    packing: PackSettings = PackSettings()
    train: TrainSettings = TrainSettings()
    # A warm start: the network's weights and tokenizer from an earlier run's model folder. Its AE is
    # reused with `init_ae`; otherwise a new one is trained (for a new image size, say) and the image side
    # relearns its latent space while the text side keeps what it knows. The ViT trains from the first
    # step, at `init_lr`.
    init: Path | None = None
    init_ae: bool = False
    init_lr: float = 1e-3


class _Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        with self.path.open("a") as f:
            f.write(stamped + "\n")


def _autoencoder(out: Path, recipe: Recipe, log: _Log) -> tuple[AutoEncoder, VAEConfig]:
    folder = out / "ae"
    if recipe.init is not None and recipe.init_ae and not folder.is_dir():
        _copy(recipe.init, folder, ("ae.safetensors", "ae_config.json"))
    if (folder / "ae.safetensors").is_file():
        cfg = VAEConfig.from_json(folder / "ae_config.json")
        ae = AutoEncoder(cfg)
        ae.load_state_dict(load_file(str(folder / "ae.safetensors")))
        log(f"autoencoder: reusing {folder}")
        return ae.eval().requires_grad_(False), cfg
    seconds = recipe.minutes * 60 * recipe.ae_fraction
    settings = AESettings(seconds=seconds)
    log(f"autoencoder: training {asdict(recipe.cfg.vae)} for <= {seconds:.0f}s / {settings.max_steps} steps")
    ae, cfg = train_autoencoder(recipe.cfg.vae, settings, seed=recipe.seed, log=log)
    log(f"autoencoder: held-out {reconstruction_check(ae)}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(folder / "ae.safetensors"))
    cfg.to_json(folder / "ae_config.json")
    return ae, cfg


def _copy(source: Path, folder: Path, names: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(Path(source) / name, folder / name)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


def run(out: Path, recipe: Recipe) -> Path:
    out = Path(out)
    log = _Log(out / "train.log")
    start = time.monotonic()
    log(f"recipe: {recipe.minutes} min, seed {recipe.seed}, mix {recipe.mix}")
    tok_dir = out / "tokenizer"
    if recipe.init is not None and not tok_dir.is_dir():  # the init's embedding rows are its token ids
        _copy(recipe.init, tok_dir, TOKENIZER_FILES)
    if not (tok_dir / "tokenizer.json").is_file():
        write_tokenizer(tok_dir, recipe.cfg.llm.vocab_size, seed=recipe.seed)
    tokenizer = BagelTokenizer(tok_dir)

    ae, vae_cfg = _autoencoder(out, recipe, log)
    cfg = replace(recipe.cfg, vae=vae_cfg)
    spent = time.monotonic() - start
    resume = latest_checkpoint(out / "checkpoints")
    # The network's budget is what is left of the run; on resume, the trainer's saved clock continues.
    reserved = recipe.eval_minutes * 60 if recipe.eval_n else 0.0
    seconds = recipe.minutes * 60 - reserved - (0 if resume else spent)
    settings = replace(recipe.train, seconds=max(seconds, 1.0))
    torch.manual_seed(recipe.seed)
    net = Bagel(cfg)
    init_weights(net, torch.Generator().manual_seed(recipe.seed))
    if recipe.init is not None:
        net.load_state_dict(load_file(str(Path(recipe.init) / "ema.safetensors")))
        settings = replace(settings, lr=recipe.init_lr, warmup_steps=50, vit_frozen_fraction=0.0)
        log(f"network: warm start from {recipe.init}")
    n_params = sum(p.numel() for p in net.parameters())
    log(f"network: {n_params / 1e6:.2f} M parameters; training for {settings.seconds:.0f}s")
    trainer = Trainer(net, ae, cfg, tok_dir, settings, seed=recipe.seed)

    plan_rng, pack_rng = random.Random(recipe.seed * 7919 + 1), random.Random(recipe.seed * 7919 + 2)
    data_state = trainer.resume(out / "checkpoints")
    if data_state:
        plan_rng.setstate(data_state["plan_rng"])
        pack_rng.setstate(data_state["pack_rng"])
        log(f"resumed at step {trainer.step} ({trainer.elapsed:.0f}s trained)")
    bank = ImageBank(ae, cfg)
    plans = PlanQueue(plan_stream(plan_rng, recipe.mix, recipe.plans))

    def batches():
        while True:
            yield pack(plans, tokenizer, bank, recipe.packing, pack_rng)

    def state() -> dict:
        return {"plan_rng": plan_rng.getstate(), "pack_rng": pack_rng.getstate()}

    trainer.fit(batches(), log=log, checkpoint_dir=out / "checkpoints", data_state=state)
    model_dir = trainer.export(out / "model")
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    log(f"model: {model_dir} ({size / 2**20:.1f} MiB), {trainer.step} steps, {bank.encoded} images encoded")
    (out / "history.json").write_text(json.dumps(trainer.history))

    if recipe.eval_n:
        report = evaluate(load(model_dir), n=recipe.eval_n, seed=10_000 + recipe.seed, log=log)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        log(f"eval: {json.dumps(report)}")
    log(f"recipe done in {(time.monotonic() - start) / 60:.1f} min")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bagel_model.training.recipe", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="run folder (created; re-run to resume)")
    parser.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget of the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=Recipe.eval_n, help="held-out cases per capability")
    parser.add_argument("--init", type=Path, help="warm start: a model folder of an earlier run")
    parser.add_argument("--init-ae", action="store_true", help="with --init: keep its autoencoder too")
    parser.add_argument("--init-lr", type=float, default=Recipe.init_lr, help="with --init: peak lr")
    args = parser.parse_args(argv)
    # The budgets above are measured on two cores. A process-wide setting: the command makes it, not `run`,
    # which a caller may import into a process whose threads are its own business.
    torch.set_num_threads(2)
    recipe = Recipe(
        minutes=args.minutes, seed=args.seed, eval_n=args.eval,
        init=args.init, init_ae=args.init_ae, init_lr=args.init_lr,
    )  # fmt: skip
    run(args.out, recipe)


if __name__ == "__main__":
    main(sys.argv[1:])
