"""Fitting rules of `lorafleet profile` that need no engine: shared by the profiler and by the re-fit
of a saved profile from its samples (pure Python, no torch).

The per-adapter term. The adapter sweep runs a full batch over 1, 2, 4, ... distinct adapters and the
model adds its slope to `base(decode seqs)` from the decode sweep. The two sweeps are timed at
different moments, and a CPU's speed drifts between them (clock, a co-tenant on a shared core, the
threads' placement): the validation profile measured the very same step (a full batch of one
adapter) at 3.48 ms in the decode sweep and 4.27 ms in the adapter sweep. Such a drift slows every
part of a compute-bound step alike, so the slope taken in absolute seconds carries the adapter
sweep's speed into a model whose base carries the decode sweep's. The slope is therefore expressed
against the adapter sweep's own one-adapter step and rescaled to the decode sweep's step at the same
batch (the one configuration both sweeps measure). Without drift the factor is 1 and nothing moves.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

Sample = tuple[float, ...]  # decode seqs, prefill tokens, total context, adapters, seconds


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope); slope 0 when the xs do not vary."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def adapter_slope(adapter: Sequence[Sample], per_ctx: float, reference_s: float | None) -> float:
    """Seconds per distinct adapter beyond the first, from the adapter sweep's samples (one batch
    size), at the speed of `reference_s`: the decode sweep's base step at that batch size (None: as
    measured). Clamped at 0, as a noisy sweep can give a negative slope."""
    if len({s[3] for s in adapter}) < 2:
        return 0.0
    ys = [s[4] - per_ctx * s[2] for s in adapter]
    _, slope = least_squares([float(s[3] - 1) for s in adapter], ys)
    slope = max(0.0, slope)
    one = [y for s, y in zip(adapter, ys) if s[3] == 1]
    level = statistics.median(one) if one else 0.0
    if reference_s is None or reference_s <= 0 or level <= 0:
        return slope
    return slope * reference_s / level


def adapter_sweep(samples: Sequence[Sample]) -> list[Sample]:
    """The adapter sweep's samples of a profile written by `lorafleet profile`: its samples are kept
    sweep by sweep (decode, context, prefill, adapters), so the adapter sweep is what follows the
    last prefill-only step (no decode sequence)."""
    last_prefill = max((i for i, s in enumerate(samples) if s[0] == 0 and s[1] > 0), default=None)
    if last_prefill is None:
        raise ValueError("the profile's samples hold no prefill sweep, so its adapter sweep cannot be found")
    return list(samples[last_prefill + 1 :])
