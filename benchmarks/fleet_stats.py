"""How sure bench_fleet.py's latency percentiles are: bootstrap 95% confidence intervals of TTFT and
TPOT p50 / p99 per run, and of the difference packing minus each other policy, and TPOT by the
phase of the plan a request arrived in. Pure numpy on the run records of fleet.json. Run alone
(`python3 benchmarks/fleet_stats.py fleet.json`), it re-renders a stored run's tables and adds the
TPOT differences at p75-p99 (`tail_table`).

Definitions (those of `lorafleet bench`): TTFT = first token - sent; TPOT = (last token - first
token) / (tokens - 1) over completed requests with more than one token (records written before
"last" was kept use "done", a few hundred microseconds later). Percentiles interpolate linearly,
as the bench's do, so the point estimates here are the tables'.

Bootstrap: the requests of a run are resampled with replacement (RESAMPLES times, a fixed seed, so
a re-render gives the same intervals) and the percentile taken of each resample; the interval is
the 2.5th to 97.5th percentile of those. The runs of one benchmark replay the same plan (request i
is the same prompt, adapter and send time in each), so a difference is resampled in pairs: the same
request indices in both runs, over the requests completed in both.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESAMPLES = 2000
SEED = 20261130
QUANTILES = (50, 99)
TAIL_QUANTILES = (75, 90, 95, 99)
PHASES = ("quiet", "burst", "quiet after")

Run = Mapping[str, Any]


def per_request(run: Run) -> dict[str, np.ndarray]:
    """TTFT and TPOT (seconds) per plan request, NaN where the request gives none; and send times."""
    n = len(run["requests"])
    ttft, tpot, sent = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for i, r in enumerate(run["requests"]):
        if r["sent"] is not None:
            sent[i] = r["sent"]
        if r["status"] != "ok" or r["first"] is None or r["sent"] is None:
            continue
        ttft[i] = r["first"] - r["sent"]
        last = r.get("last", r["done"])
        if r["tokens"] > 1 and last is not None:
            tpot[i] = (last - r["first"]) / (r["tokens"] - 1)
    return {"ttft": ttft, "tpot": tpot, "sent": sent}


def _resampled(values: np.ndarray, q: float, index: np.ndarray) -> np.ndarray:
    return np.percentile(values[index], q, axis=1)


def interval(
    values: np.ndarray, q: float, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float, float] | None:
    """(percentile, low, high) of the finite `values`; None with fewer than two."""
    x = values[np.isfinite(values)]
    if x.size < 2:
        return None
    index = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    lo, hi = np.percentile(_resampled(x, q, index), (2.5, 97.5))
    return float(np.percentile(x, q)), float(lo), float(hi)


def difference(
    a: np.ndarray, b: np.ndarray, q: float, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float, float] | None:
    """(percentile of a - percentile of b, low, high), paired over the requests finite in both."""
    if a.shape != b.shape:
        raise ValueError(f"paired runs must replay the same plan ({a.size} and {b.size} requests)")
    both = np.isfinite(a) & np.isfinite(b)
    x, y = a[both], b[both]
    if x.size < 2:
        return None
    index = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    diffs = _resampled(x, q, index) - _resampled(y, q, index)
    lo, hi = np.percentile(diffs, (2.5, 97.5))
    return float(np.percentile(x, q) - np.percentile(y, q)), float(lo), float(hi)


def phase_of(sent: np.ndarray, burst: Sequence[float]) -> np.ndarray:
    """0, 1, 2 (quiet, burst, quiet after) by send time; -1 for a request never sent."""
    out = np.full(sent.shape, -1)
    ok = np.isfinite(sent)
    out[ok] = np.where(sent[ok] < burst[0], 0, np.where(sent[ok] < burst[1], 1, 2))
    return out


# ---------------------------------------------------------------------- markdown


def _ci(ci: tuple[float, float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return "–"
    point, lo, hi = (x * 1000 for x in ci)
    if signed:
        mark = " *" if lo > 0 or hi < 0 else ""  # the interval excludes 0
        return f"{point:+,.1f} [{lo:+,.1f}, {hi:+,.1f}]{mark}"
    return f"{point:,.1f} [{lo:,.1f}, {hi:,.1f}]"


def interval_table(runs: Sequence[Run]) -> str:
    head = "| run | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |\n|---|---|---|---|---|\n"
    rows = []
    for run in runs:
        m = per_request(run)
        cells = [_ci(interval(m[k], q)) for k in ("ttft", "tpot") for q in QUANTILES]
        rows.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def difference_table(
    reference: Run, others: Sequence[Run], columns: Sequence[tuple[str, float]] | None = None
) -> str:
    """Each run's (metric, percentile) `columns` subtracted from the reference's, paired as above;
    by default TTFT and TPOT at QUANTILES."""
    columns = columns or [(k, q) for k in ("ttft", "tpot") for q in QUANTILES]
    names = " | ".join(f"{k.upper()} p{q:g} ms" for k, q in columns)
    head = f"| {reference['name']} minus | {names} |\n|---|" + "---|" * len(columns) + "\n"
    ref = per_request(reference)
    rows = []
    for run in others:
        m = per_request(run)
        cells = [_ci(difference(ref[k], m[k], q), signed=True) for k, q in columns]
        rows.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def tail_table(reference: Run, others: Sequence[Run]) -> str:
    """TPOT differences across the upper half (TAIL_QUANTILES): whether a p99 gap is a few
    requests or the whole tail shifted."""
    return difference_table(reference, others, [("tpot", q) for q in TAIL_QUANTILES])


def phase_table(runs: Sequence[Run]) -> str:
    """TPOT p50 / p99 (with the p99's interval) and request count by arrival phase."""
    head = "| run | " + " | ".join(f"{p}: n, TPOT p50 / p99 ms [p99 95% CI]" for p in PHASES) + " |\n"
    head += "|---|" + "---|" * len(PHASES) + "\n"
    rows = []
    for run in runs:
        m = per_request(run)
        phase = phase_of(m["sent"], run["burst"])
        cells = []
        for k in range(len(PHASES)):
            x = m["tpot"][(phase == k) & np.isfinite(m["tpot"])]
            ci = interval(x, 99)
            if ci is None:
                cells.append(f"{x.size}, –")
                continue
            p50 = float(np.percentile(x, 50)) * 1000
            cells.append(
                f"{x.size}, {p50:,.1f} / {ci[0] * 1000:,.1f} [{ci[1] * 1000:,.1f}, {ci[2] * 1000:,.1f}]"
            )
        rows.append(f"| {run['name']} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def policy_runs(runs: Sequence[Run], reference: str) -> tuple[list[Run], Run | None, list[Run]]:
    """The runs of the whole plan (not the kill pair's prefix), the reference among them, and the
    policies it is compared with (a kill run is not a policy)."""
    whole = [r for r in runs if not r.get("pair") and r.get("requests")]
    ref = next((r for r in whole if r["name"] == reference), None)
    return whole, ref, [r for r in whole if r is not ref and not r.get("kill")]


def markdown(runs: Sequence[Run], reference: str = "packing") -> str:
    """The three tables for the runs of one plan (the kill pair's, which replay a prefix, apart)."""
    whole, ref, others = policy_runs(runs, reference)
    if not whole:
        return ""
    text = (
        f"\nLatency percentiles with bootstrap 95% confidence intervals (fleet_stats.py: requests "
        f"resampled {RESAMPLES} times, seed {SEED}; point [low, high]):\n\n" + interval_table(whole)
    )
    if ref is not None and others:
        text += (
            f"\n{reference} minus each other policy, paired over the same plan's requests (95% CI; "
            "* where the interval excludes 0):\n\n" + difference_table(ref, others)
        )
    text += "\nTPOT by the phase a request arrived in:\n\n" + phase_table(whole)
    pair = [r for r in runs if r.get("pair") and r.get("requests")]
    if pair:
        text += "\nThe kill pair (its own prefix of the plan):\n\n" + interval_table(pair)
    return text


def main(argv: list[str] | None = None) -> int:
    """Re-render a stored fleet.json's tables, and the TPOT tail table, without re-running it."""
    p = argparse.ArgumentParser(description="bootstrap tables of a bench_fleet.py fleet.json")
    p.add_argument("fleet_json", type=Path)
    p.add_argument("--reference", default="packing", help="the run the others are subtracted from")
    args = p.parse_args(argv)
    try:
        runs = json.loads(args.fleet_json.read_text())["runs"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"fleet_stats: error: cannot read runs from {args.fleet_json}: {exc}", file=sys.stderr)
        return 2
    print(markdown(runs, args.reference))
    _, ref, others = policy_runs(runs, args.reference)
    if ref is not None and others:
        print(f"TPOT across the tail, {args.reference} minus each other policy (paired, 95% CI):\n")
        print(tail_table(ref, others))
    return 0


if __name__ == "__main__":
    sys.exit(main())
