"""The sampler's pure functions, with no model: the shifted time schedule, the CFG window, the official
guidance combination with its three renorm types (BAGEL_REFERENCE §5.5), the settings' validation and the
official per-task defaults (§5.6). Expected values are computed by hand here, not by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from bagel_model.sampling import (
    EDIT_SETTINGS,
    T2I_SETTINGS,
    FlowSettings,
    batch_cfg,
    cfg_active,
    combine_cfg,
    schedule,
)


def _velocities(seed: int, n: int = 6, c: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, c, generator=g) for _ in range(3))


# -- schedule and window ------------------------------------------------------------------------------


def test_schedule_official_values_for_50_steps_shift_3():
    times, steps = schedule(50, 3.0)
    assert len(times) == len(steps) == 49  # t = 0 is never evaluated
    assert times[:5] == pytest.approx([1.0, 0.993103, 0.986014, 0.978723, 0.971223], abs=1e-6)
    assert times[-2:] == pytest.approx([0.113208, 0.058824], abs=1e-6)
    # the Euler steps go from t = 1 all the way to t = 0
    assert sum(steps) == pytest.approx(1.0, abs=1e-6)
    assert steps[-1] == pytest.approx(times[-1], abs=1e-7)
    assert all(dt > 0 for dt in steps)


def test_schedule_by_hand_formula():
    for n, s in ((2, 3.0), (7, 1.0), (10, 0.5)):
        times, steps = schedule(n, s)
        base = [1 - i / (n - 1) for i in range(n)]
        shifted = [s * t / (1 + (s - 1) * t) for t in base]
        assert times == pytest.approx(shifted[:-1], abs=1e-6)
        assert steps == pytest.approx(
            [a - b for a, b in zip(shifted[:-1], shifted[1:], strict=True)], abs=1e-6
        )
    assert schedule(2, 3.0) == ([1.0], [1.0])


def test_cfg_window_41_of_49_steps_and_half_open():
    times, _ = schedule(50, 3.0)
    assert sum(cfg_active(t, (0.4, 1.0)) for t in times) == 41
    assert sum(cfg_active(t, (0.0, 1.0)) for t in times) == 49
    assert sum(cfg_active(t, (0.0, 0.0)) for t in times) == 0
    # official gate: start < t <= end
    assert cfg_active(1.0, (0.4, 1.0))
    assert not cfg_active(0.4, (0.4, 1.0))
    assert cfg_active(0.4000001, (0.4, 1.0))
    assert not cfg_active(0.7, (0.0, 0.5))


def test_cfg_window_boundary_is_compared_in_float32_like_the_official_loop():
    # official: `if t > cfg_interval[0] and t <= cfg_interval[1]` with t a float32 tensor; torch compares a
    # tensor with a Python float in the tensor's dtype
    t32 = torch.linspace(1, 0, 6)[:-1]  # 1, 0.8, 0.6, 0.4, 0.2 (float32, shift 1 keeps them)
    assert [bool(t > 0.4 and t <= 1.0) for t in t32] == [True, True, True, False, False]
    assert [bool(t > 0.0 and t <= 0.8) for t in t32] == [False, True, True, True, True]
    times, _ = schedule(6, 1.0)
    assert [cfg_active(t, (0.4, 1.0)) for t in times] == [True, True, True, False, False]
    assert [cfg_active(t, (0.0, 0.8)) for t in times] == [False, True, True, True, True]


# -- guidance combination -----------------------------------------------------------------------------


def test_combine_global_by_hand():
    v, vt, vi = _velocities(0)
    st, si = 4.0, 1.5
    u = vt + st * (v - vt)
    w = vi + si * (u - vi)
    scale = min(max(v.norm().item() / (w.norm().item() + 1e-8), 0.0), 1.0)
    assert scale < 1  # the case must actually renormalise
    out = combine_cfg(v, vt, vi, st, si, "global", 0.0)
    torch.testing.assert_close(out, w * scale, atol=1e-6, rtol=1e-6)
    assert out.norm().item() == pytest.approx(v.norm().item(), rel=1e-5)


def test_combine_channel_by_hand():
    v, vt, vi = _velocities(1)
    st, si = 3.0, 2.0
    u = vt + st * (v - vt)
    w = vi + si * (u - vi)
    expected = torch.stack(
        [w[i] * min(v[i].norm().item() / (w[i].norm().item() + 1e-8), 1.0) for i in range(v.shape[0])]
    )
    out = combine_cfg(v, vt, vi, st, si, "channel", 0.0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # per token, no norm exceeds the conditional one
    assert (out.norm(dim=1) <= v.norm(dim=1) * (1 + 1e-5)).all()


def test_combine_text_channel_renorms_only_the_text_term():
    v, vt, vi = _velocities(2)
    st, si = 4.0, 2.0
    u = vt + st * (v - vt)
    u = torch.stack(
        [u[i] * min(v[i].norm().item() / (u[i].norm().item() + 1e-8), 1.0) for i in range(v.shape[0])]
    )
    expected = vi + si * (u - vi)
    out = combine_cfg(v, vt, vi, st, si, "text_channel", 0.0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # the image term is not renormalised: some token ends up larger than the conditional prediction
    assert (out.norm(dim=1) > v.norm(dim=1) * 1.01).any()
    # without image CFG it is the renormalised text term alone
    torch.testing.assert_close(combine_cfg(v, vt, None, st, 1.0, "text_channel", 0.0), u)


def test_image_cfg_unused_when_text_scale_at_most_one():
    v, vt, vi = _velocities(3)
    for renorm in ("global", "channel", "text_channel"):
        for st in (0.0, 0.5, 1.0):
            assert torch.equal(combine_cfg(v, vt, vi, st, 2.0, renorm, 0.0), v)
        # the branches need not even be computed
        assert torch.equal(combine_cfg(v, None, None, 1.0, 2.0, renorm, 0.0), v)


def test_image_scale_one_is_text_cfg_only():
    v, vt, vi = _velocities(4)
    u = vt + 4.0 * (v - vt)
    scale = min(v.norm().item() / (u.norm().item() + 1e-8), 1.0)
    torch.testing.assert_close(combine_cfg(v, vt, None, 4.0, 1.0, "global", 0.0), u * scale)
    torch.testing.assert_close(combine_cfg(v, vt, vi, 4.0, 1.0, "global", 0.0), u * scale)


def test_renorm_never_grows_and_min_clamps():
    v = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    vt = 1.1 * v  # u = 1.1 v + 4 (v - 1.1 v) = 0.7 v: smaller than v, so left as is (max 1)
    for renorm in ("global", "channel", "text_channel"):
        out = combine_cfg(v, vt, None, 4.0, 1.0, renorm, 0.0)
        torch.testing.assert_close(out, 0.7 * v, atol=1e-6, rtol=1e-5)
    # renorm_min = 1 disables shrinking
    v, vt, vi = _velocities(6)
    w = vi + 1.5 * (vt + 4.0 * (v - vt) - vi)
    assert w.norm() > v.norm()
    torch.testing.assert_close(combine_cfg(v, vt, vi, 4.0, 1.5, "global", 1.0), w)
    # an intermediate minimum clamps the shrink factor from below
    ratio = v.norm().item() / w.norm().item()
    r = (1 + ratio) / 2
    torch.testing.assert_close(combine_cfg(v, vt, vi, 4.0, 1.5, "global", r), w * r, atol=1e-6, rtol=1e-6)


# -- settings -----------------------------------------------------------------------------------------


def test_official_defaults():
    assert T2I_SETTINGS == FlowSettings(50, 4.0, 1.0, (0.4, 1.0), 3.0, "global", 0.0)
    assert EDIT_SETTINGS == FlowSettings(50, 4.0, 2.0, (0.0, 1.0), 3.0, "text_channel", 0.0)


def test_interval_is_normalised_to_a_float_tuple():
    s = FlowSettings(cfg_interval=[0, 1])
    assert s.cfg_interval == (0.0, 1.0)
    assert all(isinstance(v, float) for v in s.cfg_interval)
    hash(s)  # frozen and hashable (usable as a cache key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_steps=1), "steps must be at least 2"),
        (dict(num_steps=0), "got 0"),
        (dict(renorm_type="local"), "renorm type 'local' is unknown; choose one of global, channel"),
        (dict(cfg_interval=(0.6, 0.4)), r"cfg_interval must satisfy .*\[0.6, 0.4\]"),
        (dict(cfg_interval=(0.0, 1.5)), r"cfg_interval must satisfy .*\[0.0, 1.5\]"),
        (dict(cfg_interval=(-0.1, 1.0)), "cfg_interval"),
        (dict(timestep_shift=0.0), "timestep_shift must be positive"),
        (dict(cfg_text_scale=-1.0), "must not be negative"),
        (dict(cfg_img_scale=-0.5), "must not be negative"),
    ],
)
def test_settings_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowSettings(**kwargs)


def test_settings_edge_values_accepted():
    FlowSettings(num_steps=2, cfg_interval=(0.0, 0.0), cfg_text_scale=0.0, timestep_shift=math.pi)


def test_cfg_batching_by_default_on_cuda_and_for_small_cpu_images():
    auto, off = FlowSettings(), FlowSettings(batch_cfg=False)
    assert batch_cfg(auto, torch.device("cuda"), 4096)
    assert batch_cfg(auto, torch.device("cpu"), 16)
    assert not batch_cfg(auto, torch.device("cpu"), 256)
    assert not batch_cfg(off, torch.device("cuda"), 16)
