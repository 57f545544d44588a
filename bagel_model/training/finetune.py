"""LoRA training of a loaded BAGEL on a user's examples: the library behind `train-lora` and Train LoRA.

The loss is the bundled model's (`losses.objective`): rectified-flow MSE on target latents with the
official timestep sampling (sigmoid of a normal, then the shift; official training uses shift 1) and
next-token CE on answers, over sequences laid out exactly as the tasks lay out their contexts, with the
official CFG dropout of conditions. Only the LoRA factors train (`adapters.Adapters`), with AdamW, a short
linear warm-up then a constant rate (the official fine-tuning schedule), gradient clipping at 1.0, optional
accumulation and gradient checkpointing. The base weights may be native, fp8 or nf4 (QLoRA).

Runs are deterministic in the seed: the example order, CFG dropout, flow times, noise and LoRA dropout all
come from generators seeded by it, and the process's own random state is left as it was. The adapter and
a `trainer_state.pt` (optimizer, generators, step, loss history) are saved every `save_every` steps, at the
end, and when the run is stopped (Ctrl-C, ComfyUI's Cancel): resuming from that folder continues the same
run, so a run cut in two gives the adapter the uninterrupted run gives (a test checks it bit for bit).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

import torch

from ..model import BagelModel
from .adapters import TARGETS, Adapters, LoraShape
from .data import PackSettings, pack_plans
from .folder import Examples, FolderBank
from .losses import objective

STATE_FILE = "trainer_state.pt"
TARGET_CHOICES = ("auto", *TARGETS)


@dataclass(frozen=True)
class LoraSettings:
    steps: int = 500
    lr: float = 1e-4
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1)
    dropout: float = 0.0
    targets: str = "auto"  # auto: the generation expert, plus the understanding one for answers
    batch: int = 1  # examples packed into one sequence per micro-step
    accumulate: int = 1  # micro-steps per optimizer step
    resolution: int = 512  # longest image side (capped by the model's own limits)
    seed: int = 0
    warmup_steps: int = 10
    timestep_shift: float = 1.0  # official training's
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    save_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "accumulate", "resolution", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"learning rate {self.lr} must be positive")
        if self.targets not in TARGET_CHOICES:
            raise ValueError(
                f"unknown LoRA targets {self.targets!r}; choose one of {', '.join(TARGET_CHOICES)}"
            )
        self.shape  # noqa: B018 - checks rank, alpha and dropout

    @property
    def shape(self) -> LoraShape:
        return LoraShape(self.rank, float(self.rank if self.alpha is None else self.alpha), self.dropout)

    def experts(self, examples: Examples) -> tuple[str, ...]:
        """The experts adapted: `targets`, with auto read from the examples."""
        if self.targets == "gen" and examples.has_understanding:
            raise ValueError(
                f"{examples.counts['understand']} understanding example(s) cannot train the generation "
                "expert (answers run through the understanding one): use targets auto, und or all"
            )
        if self.targets != "auto":
            return TARGETS[self.targets]
        images = any(plan.task != "understand" for plan in examples.plans)
        return ("gen",) * images + ("und",) * examples.has_understanding


@dataclass(frozen=True)
class StepReport:
    """What a callback hears after each optimizer step."""

    step: int
    steps: int
    loss: float
    seconds: float  # training time so far, resumes included

    @property
    def seconds_left(self) -> float:
        return self.seconds / max(self.step, 1) * (self.steps - self.step)


@dataclass
class TrainResult:
    adapter: Path  # adapter_model.safetensors
    steps: int  # optimizer steps done in all
    history: list[dict] = field(default_factory=list)  # one row per step: step, loss, mse, ce


class _Order:
    """Examples in a fresh shuffled order every epoch, from a generator of the run's own."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng = n, random.Random(seed)
        self.order: list[int] = []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = self.rng.sample(range(self.n), self.n)
            out.append(self.order.pop())
        return out

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def restore(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])


class _Run:
    """One training run's moving parts, so a save can happen at any step (or on a stop)."""

    def __init__(self, model: BagelModel, examples: Examples, settings: LoraSettings, out: Path):
        self.model, self.examples, self.s, self.out = model, examples, settings, Path(out)
        net = model.net
        self.adapters = Adapters(net, settings.experts(examples), settings.shape, settings.seed)
        self.opt = torch.optim.AdamW(
            self.adapters.parameters(),
            lr=settings.lr,
            betas=settings.betas,
            weight_decay=settings.weight_decay,
        )
        self.order = _Order(len(examples.plans), settings.seed)
        self.pack_rng = random.Random(settings.seed + 1)  # CFG dropout
        self.noise = torch.Generator().manual_seed(settings.seed + 2)  # flow times and noise
        self.bank = FolderBank(model.vae, model.config)
        self.step, self.seconds = 0, 0.0
        self.history: list[dict] = []
        self.generators = self._generators()  # as they were after the last whole step

    def _generators(self) -> dict:
        return {
            "order": self.order.state(),
            "pack_rng": self.pack_rng.getstate(),
            "noise": self.noise.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def _restore_generators(self, state: dict) -> None:
        self.order.restore(state["order"])
        self.pack_rng.setstate(state["pack_rng"])
        self.noise.set_state(state["noise"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.generators = state

    def lr(self) -> float:
        return self.s.lr * min(1.0, (self.step + 1) / self.s.warmup_steps)

    def train_step(self) -> dict:
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        rows = []
        for _ in range(self.s.accumulate):
            plans = [self.examples.plans[i] for i in self.order.take(self.s.batch)]
            batch = pack_plans(plans, self.model.tokenizer, self.bank, PackSettings(), self.pack_rng)
            out = objective(self.model.net, batch, self.s.timestep_shift, generator=self.noise)
            if out.loss.requires_grad:  # else these examples never reach the adapted layers (all dropped)
                (out.loss / self.s.accumulate).backward()
            rows.append(out)
        torch.nn.utils.clip_grad_norm_(self.adapters.parameters(), self.s.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.generators = self._generators()
        return {
            "step": self.step,
            "loss": fmean(float(r.loss.detach()) for r in rows),
            "mse": fmean(float(r.mse) for r in rows),
            "ce": fmean(float(r.ce) for r in rows),
        }

    def save(self) -> Path:
        """The adapter and the state after the last whole step (a step cut short is not counted: its
        draws from the generators are taken back, so a resumed run redoes it as it would have been)."""
        path = self.adapters.save(self.out, str(self.model.source))
        state = {
            "step": self.step,
            "seconds": self.seconds,
            "settings": asdict(self.s),
            "optimizer": self.opt.state_dict(),
            "generators": self.generators,
            "history": self.history,
        }
        torch.save(state, self.out / (STATE_FILE + ".tmp"))
        (self.out / (STATE_FILE + ".tmp")).rename(self.out / STATE_FILE)
        return path

    def resume(self, folder: Path) -> None:
        """Continue from a saved adapter; with its trainer state, exactly where that run stopped."""
        self.adapters.load(folder)
        state_file = Path(folder) / STATE_FILE
        if not state_file.is_file():
            return  # an adapter from elsewhere: its factors, a fresh optimizer
        state = torch.load(state_file, weights_only=False)
        saved = {k: v for k, v in state["settings"].items() if k not in ("steps", "save_every")}
        ours = {k: v for k, v in asdict(self.s).items() if k not in ("steps", "save_every")}
        changed = sorted(k for k in ours if k in saved and saved[k] != ours[k])
        if changed:
            was = ", ".join(f"{k} {saved[k]}" for k in changed)
            raise ValueError(
                f"{folder} was trained with other settings ({was}); resume with the same ones (only the "
                "number of steps may change)"
            )
        self.opt.load_state_dict(state["optimizer"])
        self._restore_generators(state["generators"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]


def train_lora(
    model: BagelModel,
    examples: Examples,
    out: Path | str,
    settings: LoraSettings = LoraSettings(),
    *,
    resume: Path | str | None = None,
    callback: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `examples` until `settings.steps` optimizer steps are done; save it in `out`.

    `resume`: an adapter folder to start from (this run's `out` to continue it). `callback` hears each
    step; an exception it raises (an interrupt) stops the run after saving what was trained, then
    propagates. The model is left as it was given: hooks removed, parameters' grad flags restored."""
    net = model.net
    trainable = [p for p in net.parameters() if p.requires_grad]
    decoder = net.language_model.model
    checkpointing = decoder.gradient_checkpointing
    devices = [net.device] if net.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed + 3)  # LoRA dropout
        run = _Run(model, examples, settings, Path(out))
        if resume is not None:
            run.resume(Path(resume))
        net.requires_grad_(False)
        decoder.gradient_checkpointing = settings.gradient_checkpointing
        run.adapters.attach()
        try:
            while run.step < settings.steps:
                start = time.monotonic()
                with torch.enable_grad():
                    row = run.train_step()
                run.seconds += time.monotonic() - start
                run.history.append(row)
                if run.step % settings.save_every == 0:
                    run.save()
                if callback is not None:
                    callback(StepReport(run.step, settings.steps, row["loss"], run.seconds))
        finally:
            run.opt.zero_grad(set_to_none=True)
            path = run.save()
            run.adapters.detach()
            decoder.gradient_checkpointing = checkpointing
            for p in trainable:
                p.requires_grad_(True)
    return TrainResult(path, run.step, run.history)
