"""Compare bench_sgmv.py runs of two kernel versions made in one process's machine, interleaved.

A kernel change measured against tables from another call cannot tell the machine from the change
(the sixth run's prologue refactor: the untouched shrink was 6% slower too). gpu_suite.sh's
`sgmv-ab` stage therefore runs `bench_sgmv.py --quick` as A (the tree), B (the tree with a patch),
A, B, on one machine in one call, and this script compares the medians case by case:

    python3 benchmarks/sgmv_ab.py DIR        # DIR/a1, DIR/b1, DIR/a2, ... each holding sgmv.json

For each kernel timing (add_lora, shrink, expand) it prints B / A per case (each side's median over
its runs), their geometric mean and worst case, and the A-to-A spread that bounds the noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

KERNELS = ("add_lora", "shrink", "expand")


def case_key(row: dict) -> tuple:
    return (row["shape"], row["rank"], row["T"], row["popularity"])


def load_runs(folder: Path, side: str) -> list[dict[tuple, dict]]:
    runs = []
    for run in sorted(folder.glob(f"{side}[0-9]*")):
        data = json.loads((run / "sgmv.json").read_text())
        runs.append({case_key(r): r for r in data["rows"]})
    return runs


def medians(runs: list[dict[tuple, dict]], kernel: str) -> dict[tuple, float]:
    keys = set.intersection(*(set(r) for r in runs))
    return {k: statistics.median(r[k][f"us_{kernel}"] for r in runs) for k in keys}


def compare(folder: Path) -> tuple[list[str], dict]:
    a_runs, b_runs = load_runs(folder, "a"), load_runs(folder, "b")
    if not a_runs or not b_runs:
        raise ValueError(
            f"{folder}: needs a1.. and b1.. folders with sgmv.json, found {len(a_runs)} A, {len(b_runs)} B"
        )
    lines = [f"# bench_sgmv A/B ({len(a_runs)} A runs, {len(b_runs)} B runs, interleaved)", ""]
    summary: dict = {}
    for kernel in KERNELS:
        a, b = medians(a_runs, kernel), medians(b_runs, kernel)
        keys = sorted(set(a) & set(b))
        ratios = {k: b[k] / a[k] for k in keys}
        # Noise: each case's spread between the A runs (max / min), when there are two or more.
        spread = [
            max(r[k][f"us_{kernel}"] for r in a_runs) / min(r[k][f"us_{kernel}"] for r in a_runs)
            for k in keys
        ]
        worst = max(ratios, key=ratios.get)
        summary[kernel] = {
            "geomean_b_over_a": statistics.geometric_mean(ratios.values()),
            "worst_b_over_a": ratios[worst],
            "worst_case": list(worst),
            "a_spread_median": statistics.median(spread),
            "cases_over_1.03": sum(v > 1.03 for v in ratios.values()),
            "cases": len(keys),
        }
        s = summary[kernel]
        lines += [
            f"## {kernel}: B/A geomean {s['geomean_b_over_a']:.3f}, worst {s['worst_b_over_a']:.3f} "
            f"({' '.join(map(str, worst))}), {s['cases_over_1.03']} of {s['cases']} cases over 1.03; "
            f"A-to-A spread median {s['a_spread_median']:.3f}",
            "",
            "| shape | rank | T | popularity | A µs | B µs | B/A |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        lines += [
            f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {a[k]:.1f} | {b[k]:.1f} | {ratios[k]:.3f} |" for k in keys
        ]
        lines.append("")
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="holds a1, b1, a2, b2, ... (bench_sgmv.py --out folders)")
    p.add_argument("--md", type=Path, help="also write the tables here")
    args = p.parse_args(argv)
    try:
        lines, summary = compare(args.folder)
    except (OSError, ValueError, KeyError) as exc:
        print(f"sgmv_ab: error: {exc}", file=sys.stderr)
        return 2
    text = "\n".join(lines)
    print(text)
    print(json.dumps(summary))
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
