"""The simulator study at equal SLO attainment: each policy at the operating point that reaches a
common attainment, then GPU-seconds, peak GPUs and p99 TTFT / TPOT side by side.

Every policy has a knob that trades GPUs for SLO attainment; the script sweeps it on one workload
and, per attainment level asked for, reports (a) the cheapest swept point that reaches it and (b) the
GPU-seconds (and the rest) interpolated linearly between the two swept points that bracket it:

- packing (with and without migration): the placement batch target (`--pack-batch-target`): fill a
  worker to N sequences before the next (the engine's headroom to its limit takes the overflow while
  the fleet grows). Lower N: more GPUs, shorter batches.
- least-loaded and round-robin: the fleet's size limit (`--max-gpus`). They spread every request, so
  no worker idles long enough to be released, and the fleet only grows when every worker is full;
  what they spend is set by how far they may grow. A batch target would only make them grow sooner
  (more GPUs, higher attainment), so it is swept too when asked (`--spread-targets`), for levels
  above what they reach at the engine's limit.

Workload flags are `lorafleet sim`'s (same names, same meaning); the study's own flags follow them.

    .venv/bin/python benchmarks/sim_equal_slo.py --trace ../shared/traces/azure_llm_2023_conv.csv \\
        --popularity servegen:../shared/traces/servegen_m_large --rate-scale 60 --profile h200-llama2-7b \\
        --min-gpus 32 --max-gpus 64 --slo-ttft-s 2 --slo-tpot-s 0.1 --out study-eq \\
        --pack-targets 32,40,48,64 --spread-caps 64,44,42,40 --attainment 0.97,0.95 --jobs 2

Each run is kept in OUT/runs/ (summary JSON plus its GPUs-over-time and latencies, .npz) and is not
run again when its file exists, so a sweep can be extended or resumed. Writes OUT/study.md,
OUT/study.json and the plots (OUT/tradeoff.png, OUT/gpus.png, OUT/latency_cdf.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sim_equal_slo_plots import write_study_plots

from lorafleet.sim.cli import add_arguments, load_workload, sim_config
from lorafleet.sim.profile import LatencyProfile, load_profile
from lorafleet.sim.report import Slo, latencies, summarize
from lorafleet.sim.sim_types import SimRequest
from lorafleet.sim.simulator import Simulator

FAMILIES = {  # name -> (policy, migrations, knob)
    "packing": ("packing", True, "target"),
    "packing-no-migration": ("packing", False, "target"),
    "least_loaded": ("least_loaded", True, "cap"),
    "round_robin": ("round_robin", True, "cap"),
    "random": ("random", True, "cap"),
}


@dataclass(frozen=True)
class Point:
    family: str
    target: int | None  # placement batch target; None = the engine's limit
    max_gpus: int

    @property
    def key(self) -> str:
        target = "limit" if self.target is None else str(self.target)
        return f"{self.family}-target{target}-max{self.max_gpus}"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"attainment levels must be in (0, 1], got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument(
        "--families",
        default="packing,packing-no-migration,least_loaded,round_robin",
        help=f"comma-separated, of {', '.join(FAMILIES)}",
    )
    p.add_argument("--pack-targets", type=_ints, default=[32, 40, 48, 64], help="packing's batch targets")
    p.add_argument(
        "--spread-caps",
        type=_ints,
        default=None,
        help="the baselines' --max-gpus values (default: --max-gpus)",
    )
    p.add_argument("--spread-targets", type=_ints, default=[], help="the baselines' batch targets, if any")
    p.add_argument("--attainment", type=_fractions, default=[0.97], help="common SLO attainment levels")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        p.error(f"--families: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(FAMILIES)}")
    args.family_list = families
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.spread_caps is None:
        args.spread_caps = [args.max_gpus]
    if max(args.spread_caps) > args.max_gpus:
        p.error(f"--spread-caps must be <= --max-gpus ({args.max_gpus})")
    return args


def plan_points(args: argparse.Namespace, limit: int) -> list[Point]:
    """Every run of the sweep; a target at or above the engine's batch limit is the limit (None)."""

    def target(n: int) -> int | None:
        return None if n >= limit else n

    points: list[Point] = []
    for family in args.family_list:
        if FAMILIES[family][2] == "target":
            points += [Point(family, target(n), args.max_gpus) for n in args.pack_targets]
        else:
            points += [Point(family, None, cap) for cap in args.spread_caps]
            points += [Point(family, target(n), args.max_gpus) for n in args.spread_targets]
    return list(dict.fromkeys(points))


# The workload and settings are set before the worker processes fork, so each inherits them.
_STATE: dict[str, Any] = {}


def _run_point(point: Point) -> dict[str, Any]:
    args, profile, requests, runs = _STATE["args"], _STATE["profile"], _STATE["requests"], _STATE["runs"]
    policy, migrations, _ = FAMILIES[point.family]
    base = sim_config(args, policy, migrations)
    config = dataclasses.replace(base, max_gpus=point.max_gpus, pack_batch_target=point.target)
    t0 = time.perf_counter()
    result = Simulator(config, profile, requests).run()
    result.sim_wall_s = time.perf_counter() - t0
    summary = summarize(result, Slo(args.slo_ttft_s, args.slo_tpot_s))
    summary.update(family=point.family, max_gpus=point.max_gpus, key=point.key)
    ttft, tpot, _ = latencies(result)
    gpus = np.array(result.gpus_over_time or [(0.0, 0)], dtype=np.float64)
    np.savez_compressed(
        runs / f"{point.key}.npz", ttft=ttft.astype(np.float32), tpot=tpot.astype(np.float32), gpus=gpus
    )
    (runs / f"{point.key}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"  {point.key}: {summary['gpu_seconds']:,.0f} GPU-s, peak {summary['peak_gpus']}, "
        f"SLO {100 * summary['slo_attainment']:.1f}% ({result.sim_wall_s:.0f} s)",
        flush=True,
    )
    return summary


def run_sweep(args: argparse.Namespace, profile: LatencyProfile, requests: list[SimRequest]) -> list[dict]:
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    points = plan_points(args, profile.engine.max_batch_size)
    done = {p: runs / f"{p.key}.json" for p in points if (runs / f"{p.key}.json").is_file()}
    todo = [p for p in points if p not in done]
    print(f"{len(points)} runs: {len(done)} kept from {runs}, {len(todo)} to run", flush=True)
    _STATE.update(args=args, profile=profile, requests=requests, runs=runs)
    if args.jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("fork").Pool(min(args.jobs, len(todo))) as pool:
            pool.map(_run_point, todo, chunksize=1)
    else:
        for p in todo:
            _run_point(p)
    return [json.loads((runs / f"{p.key}.json").read_text()) for p in points]


# ---------------------------------------------------------------------- equal attainment

METRICS = ("gpu_seconds", "peak_gpus", "ttft_p99_s", "tpot_p99_s", "ttft_p50_s", "tpot_p50_s")


def knob_order(family: str, runs: list[dict]) -> list[dict]:
    """A family's runs from the fewest GPUs to the most by its knob: a higher batch target or a
    lower fleet limit spends less. (The baselines' batch-target runs come after their caps.)"""

    def key(r: dict) -> tuple[float, float]:
        target = r["pack_batch_target"]
        if FAMILIES[family][2] == "target":
            return (0, -(target if target is not None else 1e9))
        return (0, r["max_gpus"]) if target is None else (1, -target)

    return sorted(runs, key=key)


def at_attainment(family: str, runs: list[dict], level: float) -> dict[str, Any]:
    """The family at `level`: its cheapest run reaching it, and the metrics interpolated between the
    two neighbouring runs (by knob) whose attainments bracket it."""
    ordered = knob_order(family, runs)
    reaching = [r for r in ordered if r["slo_attainment"] >= level]
    out: dict[str, Any] = {"family": family, "level": level}
    out["cheapest"] = min(reaching, key=lambda r: r["gpu_seconds"]) if reaching else None
    out["interpolated"] = None
    for lo, hi in itertools.pairwise(ordered):
        a, b = lo["slo_attainment"], hi["slo_attainment"]
        if min(a, b) <= level <= max(a, b) and a != b:
            w = (level - a) / (b - a)
            values = {m: lo[m] + w * (hi[m] - lo[m]) for m in METRICS}
            out["interpolated"] = {**values, "between": [lo["key"], hi["key"]]}
            break
    if out["interpolated"] is None and ordered and ordered[0]["slo_attainment"] >= level:
        out["note"] = "its cheapest setting swept already exceeds this level"
    elif out["interpolated"] is None:
        out["note"] = "no swept setting brackets this level"
    return out


def _fmt_point(r: dict) -> str:
    target = r["pack_batch_target"]
    knob = f"target {target}" if target is not None else "target = limit"
    return (
        f"| {r['family']} | {knob}, max {r['max_gpus']} | {r['gpu_seconds']:,.0f} | {r['peak_gpus']} | "
        f"{100 * r['slo_attainment']:.1f} | {1e3 * r['ttft_p50_s']:,.0f} | {1e3 * r['ttft_p99_s']:,.0f} | "
        f"{1e3 * r['tpot_p50_s']:.1f} | {1e3 * r['tpot_p99_s']:.1f} | {r['migrations']:,} |"
    )


def report(args: argparse.Namespace, runs: list[dict], picks: list[dict], wall_s: float) -> str:
    head = (
        "| family | setting | GPU-s | peak GPUs | SLO % | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
        "TPOT p99 ms | migrations |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [f"command: {' '.join(sys.argv)}", f"machine: {platform.node()}, sweep wall {wall_s:.0f} s", ""]
    for level in args.attainment:
        lines += [
            f"### At {100 * level:g}% SLO attainment",
            "",
            "Cheapest swept setting reaching it:",
            "",
            head,
        ]
        for pick in (p for p in picks if p["level"] == level):
            lines.append(_fmt_point(pick["cheapest"]) if pick["cheapest"] else f"| {pick['family']} | none |")
        lines += ["", "Interpolated to exactly this level (between the two bracketing settings):", ""]
        lines += [
            "| family | GPU-s | peak GPUs | TTFT p99 ms | TPOT p99 ms | between |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for pick in (p for p in picks if p["level"] == level):
            i = pick["interpolated"]
            if i is None:
                lines.append(f"| {pick['family']} | - | - | - | - | {pick.get('note', '')} |")
            else:
                lines.append(
                    f"| {pick['family']} | {i['gpu_seconds']:,.0f} | {i['peak_gpus']:.1f} | "
                    f"{1e3 * i['ttft_p99_s']:,.0f} | {1e3 * i['tpot_p99_s']:.1f} | "
                    f"{' / '.join(i['between'])} |"
                )
        lines.append("")
    lines += ["### Every run", "", head]
    lines += [
        _fmt_point(r) for f in args.family_list for r in knob_order(f, [x for x in runs if x["family"] == f])
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = load_profile(args.profile)
    limit = profile.engine.max_batch_size
    if max(args.pack_targets + args.spread_targets) > limit:
        raise SystemExit(f"batch targets must be <= the profile's max_batch_size ({limit})")
    requests, info = load_workload(args, profile)
    print(f"workload: {info.source}: {info.requests} requests, {info.adapters} adapters", flush=True)
    t0 = time.perf_counter()
    runs = run_sweep(args, profile, requests)
    wall = time.perf_counter() - t0
    picks = [
        at_attainment(f, [r for r in runs if r["family"] == f], level)
        for level in args.attainment
        for f in args.family_list
    ]
    out = Path(args.out)
    text = report(args, runs, picks, wall)
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps({"runs": runs, "picks": picks}, indent=1) + "\n")
    if not args.no_plots:
        write_study_plots(args.family_list, runs, picks, out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
