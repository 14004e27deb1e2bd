"""The profiler's fitting rules that need no engine (`sim/profile_fit.py`) and its interleaved rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.sim.profile import load_profile
from lorafleet.sim.profile_fit import adapter_slope, adapter_sweep, least_squares

VALIDATION_PROFILE = Path(__file__).parents[2] / "docs/sim/validation-h200-host/profile.yaml"


def _sweep(base: float, per_adapter: float, speed: float = 1.0, per_ctx: float = 0.0) -> list[tuple]:
    # A full batch of 4 over 1, 2, 4 adapters; `speed` slows every part of the step alike.
    rows = []
    for adapters in (1, 2, 4):
        for ctx in (80, 84, 88):
            step = base + per_adapter * (adapters - 1) + per_ctx * ctx
            rows.append((4, 0, ctx, adapters, step * speed))
    return rows


def test_least_squares() -> None:
    assert least_squares([1, 2, 3], [3, 5, 7]) == pytest.approx((1.0, 2.0))
    assert least_squares([2, 2], [1.0, 3.0]) == (2.0, 0.0)


def test_the_adapter_slope_is_taken_at_the_decode_sweeps_speed() -> None:
    # Measured 25% slow, the sweep's absolute slope is 1.25 ms; at the decode sweep's speed (its
    # base step 4 ms, context term removed, where the adapter sweep timed 5 ms) it is 1 ms.
    slow = _sweep(0.004, 0.001, speed=1.25, per_ctx=1e-6)
    assert adapter_slope(slow, 1e-6 * 1.25, None) == pytest.approx(0.00125)
    assert adapter_slope(slow, 1e-6 * 1.25, 0.004) == pytest.approx(0.001)
    # No drift: the reference equals the sweep's own level and nothing changes.
    same = _sweep(0.004, 0.001)
    assert adapter_slope(same, 0.0, 0.004) == pytest.approx(adapter_slope(same, 0.0, None))


def test_the_adapter_slope_edge_cases() -> None:
    assert adapter_slope([(4, 0, 80, 1, 0.004)] * 3, 0.0, 0.004) == 0.0  # one adapter count: no slope
    assert adapter_slope(_sweep(0.004, -0.001), 0.0, 0.004) == 0.0  # negative: clamped
    assert adapter_slope(_sweep(0.004, 0.001), 0.0, 0.0) == pytest.approx(0.001)  # no reference


def test_the_adapter_sweep_is_found_after_the_prefill_sweep() -> None:
    samples = [(1, 0, 20, 1, 0.003), (0, 16, 16, 1, 0.003), (0, 64, 64, 1, 0.004), (4, 0, 80, 2, 0.006)]
    assert adapter_sweep(samples) == [(4, 0, 80, 2, 0.006)]
    with pytest.raises(ValueError, match="no prefill sweep"):
        adapter_sweep(samples[:1])


def test_the_saved_validation_profile_re_fits_from_its_samples() -> None:
    # docs/sim/validation-h200-host/profile.yaml: the same step (batch 4, one adapter) took 3.48 ms
    # in its decode sweep and 4.27 ms in its adapter sweep; its slope of 0.98 ms becomes 0.80 ms.
    profile = load_profile(str(VALIDATION_PROFILE))
    sweep = adapter_sweep(profile.samples)
    assert {s[0] for s in sweep} == {4} and {s[3] for s in sweep} == {1, 2, 4}
    assert adapter_slope(sweep, profile.per_context_token_s, None) == pytest.approx(profile.per_adapter_s)
    refit = adapter_slope(sweep, profile.per_context_token_s, profile.decode_base_s[-1])
    assert refit == pytest.approx(0.000802, rel=0.01)


def test_rounds_spread_the_repeats() -> None:
    from lorafleet.sim import profiler

    assert profiler._rounds(20) == [5, 5, 5, 5]
    assert profiler._rounds(10) == [3, 3, 2, 2]
    assert profiler._rounds(2) == [1, 1]
    assert profiler._rounds(1) == [1]
