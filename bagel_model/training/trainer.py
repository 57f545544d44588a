"""The training loop's state: initial weights, AdamW, EMA, gradient clipping, checkpoints and resume.

Official settings where they carry over (BAGEL_REFERENCE §6.1, §6.4): AdamW with betas (0.9, 0.95) and no
weight decay, gradients clipped to norm 1.0, an EMA of every trainable parameter updated after each
optimizer step, `*_moe_gen` weights initialised as copies of their understanding twins (`copy_init_moe`),
`llm2vae` zero-initialised. What a from-scratch tiny model needs differently: warmup then cosine decay
over a *time* budget (the run ends on time, whatever else shares the CPU), and an EMA decay of 0.995
rather than 0.9999, which would average over more steps than the run has.

A checkpoint is a directory `{step:07d}/` that is itself a loadable model folder (the official layout via
`checkpoint.save`: configs, `ema.safetensors`, `ae.safetensors`, `bagel_inference.json`, tokenizer files),
plus `model.safetensors` (the raw weights, as official checkpoints keep them) and `trainer_state.pt`
(optimizer, step, elapsed time, RNG and data states), written last so a half-written checkpoint is ignored.

Not here: what a batch holds or how the loss is computed (`data.py`, `losses.py`).
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import save
from ..config import BagelConfig
from ..layers.embeddings import PositionTable, sincos_2d_table
from ..layers.ops import RMSNorm
from ..layers.vae import AutoEncoder
from ..model import Bagel
from .data import Packed
from .losses import objective
from .schedule import warmup_cosine_lr

STATE_FILE = "trainer_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class TrainSettings:
    seconds: float = 3600.0  # wall-clock budget of the whole run (resumes included)
    max_steps: int = 1_000_000  # and a step budget; the schedule follows whichever is further along
    lr: float = 2e-3
    final_lr_ratio: float = 0.05
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    # Official training uses shift 1; we train with the inference shift. A 16-token image's content is its
    # layout, which is decided at high t, where the caption matters; measured on t2i, the caption-swap gap
    # of the flow loss at t = 0.8 grows about twice as fast with shift 3 as with 1.
    timestep_shift: float = 3.0
    # A from-scratch ViT collapses under Adam: shapes-world patches are mostly white, so every update moves
    # all its inputs' weights the same way and the constant part drowns the image within ~50 steps, before
    # the decoder learns to read it. So the ViT (not its connector) is frozen at its random init for the first
    # `vit_frozen_fraction` of the run, then trained end to end at `vit_lr_scale` of the learning rate.
    vit_frozen_fraction: float = 0.15
    vit_lr_scale: float = 0.3
    log_every: int = 10
    save_every_s: float = 300.0
    keep_checkpoints: int = 2


# -- initial weights -------------------------------------------------------------------------------------

_RESIDUAL_OUT = ("o_proj", "down_proj", "out_proj", "fc2")


@torch.no_grad()
def init_weights(net: Bagel, generator: torch.Generator) -> None:
    """From-scratch weights with O(1) activations for every token kind.

    Linear layers are LeCun-normal (std 1/sqrt(fan_in)); layers writing into a residual stream are further
    scaled by 1/sqrt(2 * layers); embeddings are N(0, 1), the scale of the frozen sin-cos tables that image
    tokens carry; norms are 1; `llm2vae` and `lm_head` start at zero (the official `llm2vae` init; a zero
    `lm_head` starts CE at log(vocab)). Generation experts then copy their understanding twins."""
    depth = {
        "vit_model": net.config.vit.num_hidden_layers,
        "language_model": net.config.llm.num_hidden_layers,
    }
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            std = module.in_features**-0.5
            if name.rsplit(".", 1)[-1] in _RESIDUAL_OUT and name.split(".")[0] in depth:
                std /= math.sqrt(2 * depth[name.split(".")[0]])
            module.weight.normal_(0.0, std, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 1.0, generator=generator)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, PositionTable):
            module.pos_embed.copy_(sincos_2d_table(module.pos_embed.shape[1], module.grid))
    net.llm2vae.weight.zero_()
    net.llm2vae.bias.zero_()
    net.language_model.lm_head.weight.zero_()
    params = dict(net.named_parameters())
    for name, p in params.items():
        if "_moe_gen" in name:
            p.copy_(params[name.replace("_moe_gen", "")])


# -- the trainer -----------------------------------------------------------------------------------------


class Trainer:
    """Owns the network being trained, its EMA and optimizer; the AE and tokenizer ride along for exports."""

    def __init__(
        self,
        net: Bagel,
        ae: AutoEncoder,
        cfg: BagelConfig,
        tokenizer_dir: Path,
        settings: TrainSettings,
        seed: int = 0,
    ):
        self.net, self.ae, self.cfg, self.settings = net.train(), ae, cfg, settings
        self.tokenizer_dir = Path(tokenizer_dir)
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        vit = [p for n, p in net.named_parameters() if n.startswith("vit_model.") and p.requires_grad]
        rest = [p for n, p in net.named_parameters() if not n.startswith("vit_model.") and p.requires_grad]
        self.opt = torch.optim.AdamW(
            [{"params": rest}, {"params": vit, "vit": True}],
            lr=settings.lr,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.elapsed = 0.0  # seconds of training so far, across resumes
        self.history: list[dict] = []  # logged rows

    @property
    def progress(self) -> float:
        s = self.settings
        return max(self.step / s.max_steps, self.elapsed / s.seconds)

    @property
    def done(self) -> bool:
        return self.progress >= 1.0

    def lr(self) -> float:
        s = self.settings
        return warmup_cosine_lr(s.lr, self.step, self.progress, s.warmup_steps, s.final_lr_ratio)

    def vit_lr_scale(self) -> float:
        return 0.0 if self.progress < self.settings.vit_frozen_fraction else self.settings.vit_lr_scale

    def train_step(self, batch: Packed) -> dict:
        """One optimizer step on one packed sequence; returns its numbers."""
        s = self.settings
        lr = self.lr()
        for group in self.opt.param_groups:
            group["lr"] = lr * (self.vit_lr_scale() if group.get("vit") else 1.0)
        out = objective(self.net, batch, s.timestep_shift, s.ce_weight, s.mse_weight, self.generator)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
        self.opt.step()
        self._update_ema()
        self.step += 1
        row = {
            "step": self.step,
            "lr": lr,
            "loss": float(out.loss.detach()),
            "grad_norm": float(grad_norm),
            "tokens": batch.length,
            **{f"ce/{k}": v for k, v in out.ce_by_task.items()},
            **{f"mse/{k}": v for k, v in out.mse_by_task.items()},
        }
        if out.ce_by_task:  # a sequence may hold no scored text (or no target): leave it out of the means
            row["ce"] = float(out.ce)
        if out.mse_by_task:
            row["mse"] = float(out.mse)
        return row

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.settings.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
            e.lerp_(p.detach(), 1 - decay)

    def fit(
        self,
        batches: Iterator[Packed],
        log: Callable[[str], None] = print,
        checkpoint_dir: Path | None = None,
        data_state: Callable[[], dict] | None = None,
    ) -> None:
        """Train until the time or step budget is spent, logging every `log_every` steps (averaged) and
        writing a checkpoint every `save_every_s` seconds and at the end."""
        s = self.settings
        last_save = self.elapsed
        window: list[dict] = []
        while not self.done:
            t0 = time.monotonic()
            row = self.train_step(next(batches))
            self.elapsed += time.monotonic() - t0
            window.append(row)
            if self.step % s.log_every == 0:
                self.history.append(_mean_row(window, self.elapsed))
                log(_format_row(self.history[-1]))
                window = []
            if checkpoint_dir is not None and self.elapsed - last_save >= s.save_every_s:
                self.save_checkpoint(checkpoint_dir, data_state() if data_state else {})
                last_save = self.elapsed
        if checkpoint_dir is not None:
            self.save_checkpoint(checkpoint_dir, data_state() if data_state else {})

    # -- files ---------------------------------------------------------------------------------------

    def export(self, folder: Path) -> Path:
        """The EMA weights as a model folder in the official layout, with this run's AE and tokenizer."""
        folder = Path(folder)
        save(self.ema, self.ae, self.cfg, folder)
        for name in TOKENIZER_FILES:
            if (self.tokenizer_dir / name).is_file():
                shutil.copy(self.tokenizer_dir / name, folder / name)
        return folder

    def save_checkpoint(self, root: Path, data_state: dict | None = None) -> Path:
        root = Path(root)
        folder = self.export(root / f"{self.step:07d}")
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "optimizer": self.opt.state_dict(),
            "generator": self.generator.get_state(),
            "settings": asdict(self.settings),
            "history": self.history,
            "data": data_state or {},
        }
        torch.save(state, folder / (STATE_FILE + ".tmp"))
        (folder / (STATE_FILE + ".tmp")).rename(folder / STATE_FILE)
        for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())[
            : -self.settings.keep_checkpoints
        ]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def resume(self, root: Path) -> dict | None:
        """Load the latest complete checkpoint under `root`; returns its data state, or None if none."""
        folder = latest_checkpoint(root)
        if folder is None:
            return None
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
        state = torch.load(folder / STATE_FILE, weights_only=False)
        self.opt.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
        return state["data"]


def latest_checkpoint(root: Path) -> Path | None:
    root = Path(root)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name)) if done else None


def _mean_row(rows: list[dict], elapsed: float) -> dict:
    keys = {k for r in rows for k in r}
    out = {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
    out["step"], out["elapsed"] = rows[-1]["step"], elapsed
    return out


def _format_row(row: dict) -> str:
    head = (
        f"step {row['step']} t={row['elapsed']:.0f}s lr={row['lr']:.2e} loss={row['loss']:.4f} "
        f"ce={row.get('ce', 0):.4f} mse={row.get('mse', 0):.4f} gn={row['grad_norm']:.2f} "
        f"tok={row['tokens']:.0f}"
    )
    tasks = " ".join(f"{k}={v:.3f}" for k, v in sorted(row.items()) if "/" in k)
    return f"{head} | {tasks}"
