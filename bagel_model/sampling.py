"""Rectified-flow sampling as pure functions: the time schedule, the CFG window, the guidance combination.

Convention (official): x_t = (1 - t) x_0 + t * noise, t = 1 is pure noise, the network predicts
v = noise - x_0, and an Euler step is x <- x - v * dt. `euler` is the loop itself, over any velocity
function; `engine.py` gives it BAGEL's guided velocity. Nothing here knows about the model, PIL or files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass(frozen=True)
class FlowSettings:
    """Sampler knobs with the official text-to-image defaults (notebook: cfg_img_scale 1.0)."""

    num_steps: int = 50
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    timestep_shift: float = 3.0
    renorm_type: str = "global"
    renorm_min: float = 0.0
    step_cache: int = 1  # k > 1: run the network on every k-th step only (see `extrapolate_velocity`)
    # A step's CFG branches in one forward: fewer, larger matmuls, more activation memory. None: on CUDA,
    # and on the CPU for small images (<= BATCH_CFG_CPU_TOKENS latent tokens), where per-forward overhead
    # dominates; measured on 2 CPU cores it wins 1.4-1.8x at 16 tokens and loses 5-20% at 256-1024.
    batch_cfg: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cfg_interval", tuple(float(v) for v in self.cfg_interval))
        # Headless clients can send NaN or infinity through the HTTP API: every comparison below is False
        # for NaN, so non-finite values are refused first, by name.
        numbers = {
            "cfg_text_scale": self.cfg_text_scale,
            "cfg_img_scale": self.cfg_img_scale,
            "cfg_interval start": self.cfg_interval[0],
            "cfg_interval end": self.cfg_interval[1],
            "timestep_shift": self.timestep_shift,
            "renorm_min": self.renorm_min,
        }
        for name, value in numbers.items():
            check_finite(name, value)
        if self.num_steps < 2:
            raise ValueError(
                f"steps must be at least 2 (got {self.num_steps}): the last time, 0, is never evaluated"
            )
        if self.renorm_type not in RENORM_TYPES:
            raise ValueError(
                f"renorm type {self.renorm_type!r} is unknown; choose one of {', '.join(RENORM_TYPES)}"
            )
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {self.timestep_shift}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1, got [{lo}, {hi}]")
        if self.cfg_text_scale < 0 or self.cfg_img_scale < 0:
            raise ValueError("CFG scales must not be negative")
        if self.step_cache < 1:
            raise ValueError(f"step_cache must be at least 1 (1 = off), got {self.step_cache}")


def check_finite(name: str, value: float) -> None:
    """Refuse NaN and infinities, naming the setting."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def flow_settings(base: FlowSettings, **knobs: object) -> FlowSettings:
    """`base` with the user's knobs applied; a knob that is None keeps the base value.

    The knobs are the flat names the CLI and the node widgets share: steps, cfg_text_scale, cfg_img_scale,
    cfg_interval_start, cfg_interval_end, timestep_shift, renorm_type, renorm_min, step_cache."""
    fields = {
        "steps": "num_steps",
        "cfg_text_scale": "cfg_text_scale",
        "cfg_img_scale": "cfg_img_scale",
        "timestep_shift": "timestep_shift",
        "renorm_type": "renorm_type",
        "renorm_min": "renorm_min",
        "step_cache": "step_cache",
    }
    unknown = set(knobs) - set(fields) - {"cfg_interval_start", "cfg_interval_end"}
    if unknown:
        raise TypeError(f"unknown sampler settings: {', '.join(sorted(unknown))}")
    changes = {fields[k]: v for k, v in knobs.items() if k in fields and v is not None}
    lo, hi = knobs.get("cfg_interval_start"), knobs.get("cfg_interval_end")
    if lo is not None or hi is not None:
        base_lo, base_hi = base.cfg_interval
        changes["cfg_interval"] = (base_lo if lo is None else lo, base_hi if hi is None else hi)
    return replace(base, **changes)


BATCH_CFG_CPU_TOKENS = 64


def batch_cfg(settings: FlowSettings, device: torch.device, latent_tokens: int) -> bool:
    """Whether to run a step's CFG branches as one forward (see `FlowSettings.batch_cfg`)."""
    if settings.batch_cfg is not None:
        return settings.batch_cfg
    return device.type == "cuda" or latent_tokens <= BATCH_CFG_CPU_TOKENS


EDIT_SETTINGS = FlowSettings(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), renorm_type="text_channel")
T2I_SETTINGS = FlowSettings()


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The official timestep shift: shift > 1 spends more of the schedule (or of training) at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def schedule(num_steps: int, shift: float) -> tuple[list[float], list[float]]:
    """The evaluated times (num_steps - 1 of them, from 1 down, 0 excluded) and the Euler step sizes.

    Returned as Python floats: the loop needs them on the host to decide CFG, and computing them once here
    keeps device syncs out of the loop."""
    t = shift_time(torch.linspace(1, 0, num_steps), shift)
    return t[:-1].tolist(), (t[:-1] - t[1:]).tolist()


def cfg_active(t: float, interval: tuple[float, float]) -> bool:
    """Guidance applies on the half-open window (start, end] of the shifted time.

    Compared in float32, as the official loop compares its float32 time tensor with the bounds: at a time
    equal to float32(bound) a float64 comparison would flip the decision."""
    lo, hi = torch.tensor(interval, dtype=torch.float32).tolist()
    return lo < t <= hi


def _renorm(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, minimum: float) -> torch.Tensor:
    """Shrink `guided` so its norm does not exceed the conditional prediction's (never grows it)."""
    if per_token:
        ref, new = reference.norm(dim=-1, keepdim=True), guided.norm(dim=-1, keepdim=True)
    else:
        ref, new = reference.norm(), guided.norm()
    return guided * (ref / (new + 1e-8)).clamp(min=minimum, max=1.0)


def combine_cfg(
    v: torch.Tensor,  # (n, c) conditional velocity
    v_text: torch.Tensor | None,  # without the text prompt
    v_img: torch.Tensor | None,  # without the images
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Official text/image CFG with renormalisation. Image CFG only acts together with text CFG."""
    if text_scale <= 1.0:
        return v
    u = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        u = _renorm(v, u, per_token=True, minimum=renorm_min)
        return v_img + img_scale * (u - v_img) if img_scale > 1.0 else u
    w = v_img + img_scale * (u - v_img) if img_scale > 1.0 else u
    return _renorm(v, w, per_token=renorm_type == "channel", minimum=renorm_min)


def extrapolate_velocity(
    t: float, earlier: tuple[float, torch.Tensor], last: tuple[float, torch.Tensor]
) -> torch.Tensor:
    """First-order Taylor estimate of the guided velocity at t from the last two network evaluations.

    The velocity of a rectified flow changes slowly along the trajectory, so skipped steps can reuse its
    trend (the idea of TaylorSeer, applied to the model's output rather than to every layer's features:
    one tensor of memory per branch-free step instead of caches in every layer)."""
    (t0, v0), (t1, v1) = earlier, last
    return v1 + (v1 - v0) * ((t - t1) / (t1 - t0))


def euler(
    velocity: Callable[[float, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    times: Sequence[float],
    steps: Sequence[float],
    step_cache: int = 1,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from noise `x` (t = 1) to data (t = 0) by Euler steps of sizes `steps` at `times` (both
    from `schedule`).

    `velocity(t, x)` is evaluated at each step, except with `step_cache = k > 1`: then only every k-th step
    (and the first two, which seed the trend) calls it and the others extrapolate (faster, not identical).
    `callback(step, total, x0)` follows every step with the step's estimate of the clean sample,
    x0 = x - t v (what a preview shows; at the last step it is the result); an exception raised there stops
    the loop."""
    evaluated: list[tuple[float, torch.Tensor]] = []  # the last two (t, v) from `velocity`
    for i, (t, dt) in enumerate(zip(times, steps, strict=True)):
        if step_cache > 1 and len(evaluated) == 2 and i % step_cache:
            v = extrapolate_velocity(t, *evaluated)
        else:
            v = velocity(t, x)
            evaluated = [*evaluated[-1:], (t, v)]
        if callback is not None:
            callback(i + 1, len(times), x - v * t)
        x = x - v * dt
    return x
