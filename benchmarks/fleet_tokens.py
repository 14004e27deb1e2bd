"""Comparing the greedy tokens of two runs of one plan, raw and by the decisive-step rule.

bf16 arithmetic depends on the batch a sequence shares (other kernels' splits and tile shapes, the
recompute of a resumed sequence's KV cache as a prefill instead of step by step), so two runs of
the same plan can pick different argmax tokens wherever the top two candidates are nearly tied;
after one such flip the rest of the sequence follows another path. Counting those as "different
outputs" measures bf16, not the fleet. The decisive-step rule compares a request's tokens only up
to its first near-tie in the reference run: step k is a near-tie when the reference's top-1 and
top-2 logprobs differ by less than `tolerance` nats; tokens 0..k-1 must be equal, and token k
onwards is not compared. A request "differs" only if its tokens differ before its first near-tie.
The gaps come from the API (`top_logprobs=2` on every request of every run).

Run records are bench_fleet.py's: `requests[i]` holds `status`, `token_ids` and `top_gaps` (the
top-1 minus top-2 logprob per generated token, or None when the run did not ask for them).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Run = Mapping[str, Any]

# The tolerances the report sweeps, besides the one it judges by. The random 7B's logits lie near
# 64-128 in the second GPU run, where the bf16 logits the LM head returns are 0.5 apart, so every
# gap is a multiple of 0.5: below 0.5 the rule only skips exact ties.
# float32's gaps are not quantized: 0.001 shows its near-ties.
SWEEP = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)

CUT_OFF = ("unfinished", "unsent")  # fleet_run.py's statuses of requests the time budget cut off


def first_near_tie(gaps: Sequence[float] | None, tolerance: float) -> int | None:
    """Index of the first step whose top-2 gap is below `tolerance`; None when there is none (or
    no gaps: then the whole sequence is compared)."""
    if gaps is None:
        return None
    return next((k for k, gap in enumerate(gaps) if gap < tolerance), None)


def decisive_prefix(reference: Mapping[str, Any], tolerance: float) -> int:
    """How many leading tokens of `reference` are decided by more than `tolerance`."""
    tokens = reference["token_ids"]
    k = first_near_tie(reference.get("top_gaps"), tolerance)
    return len(tokens) if k is None else min(k, len(tokens))


def compare_runs(
    reference: Run, other: Run, tolerance: float, sweep: Sequence[float] = SWEEP
) -> dict[str, Any]:
    """Lost requests in `other`, and requests completed in both whose tokens differ: raw, and by
    the decisive-step rule at `tolerance` (and at each of `sweep`).

    Request i of one run is request i of the other (the same plan; `other` may hold a prefix).
    """
    ref, oth = reference["requests"], other["requests"]
    if len(oth) > len(ref):
        raise ValueError(f"the runs replayed different plans ({len(ref)} and {len(oth)} requests)")
    if any(a["prompt_len"] != b["prompt_len"] or a["adapter"] != b["adapter"] for a, b in zip(ref, oth)):
        raise ValueError("the runs replayed different plans (prompts or adapters differ)")
    # A request the budget cut off (never finished or never sent) in either run is not lost to the
    # fleet: counted apart, and not compared (the first GPU float32 pair compared the kill run's
    # tokens against a reference cut off after 1.7 s).
    lost = [i for i, r in enumerate(oth) if r["status"] != "ok" and r["status"] not in CUT_OFF]
    both = [i for i in range(len(oth)) if ref[i]["status"] == "ok" and oth[i]["status"] == "ok"]
    judged = set(both) | set(lost)
    cut = [i for i in range(len(oth)) if i not in judged]
    raw = [i for i in both if ref[i]["token_ids"] != oth[i]["token_ids"]]
    lengths = [i for i in both if len(ref[i]["token_ids"]) != len(oth[i]["token_ids"])]
    have_gaps = all(ref[i].get("top_gaps") is not None for i in both)

    def decisive(tol: float) -> dict[str, Any]:
        differ, compared = [], 0
        for i in both:
            n = decisive_prefix(ref[i], tol)
            compared += n
            if ref[i]["token_ids"][:n] != oth[i]["token_ids"][:n]:
                differ.append(i)
        return {"tolerance": tol, "differ": len(differ), "requests": differ[:20], "tokens_compared": compared}

    first = []
    for i in raw[:5]:
        a, b = ref[i]["token_ids"], oth[i]["token_ids"]
        at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gaps = ref[i].get("top_gaps")
        gap = gaps[at] if gaps is not None and at < len(gaps) else None
        first.append({"request": i, "position": at, "tokens": len(a), "reference_gap": gap})
    return {
        "reference": reference["name"],
        "other": other["name"],
        "lost": len(lost),
        "lost_requests": lost[:20],
        "cut_off": len(cut),
        "compared": len(both),
        "tokens": sum(len(ref[i]["token_ids"]) for i in both),
        "differ": len(raw),
        "length_differs": len(lengths),
        "first_differences": first,
        "decisive": decisive(tolerance) if have_gaps else None,
        "sweep": [decisive(t) for t in sweep] if have_gaps else [],
    }


def top_gap(top: Sequence[tuple[int, float]]) -> float:
    """Top-1 minus top-2 logprob of one step's alternatives (best first); inf with one candidate."""
    if len(top) < 2:
        return float("inf")
    return top[0][1] - top[1][1]


def main() -> int:
    """Compare the runs of a fleet.json again, against its first run, at other tolerances."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("fleet_json", type=Path)
    p.add_argument("--tolerances", default=",".join(str(t) for t in SWEEP))
    args = p.parse_args()
    runs = json.loads(args.fleet_json.read_text())["runs"]
    tolerances = [float(t) for t in args.tolerances.split(",")]
    reference, others = runs[0], runs[1:]
    print(
        f"| near-tie below (nats) | {' | '.join(r['name'] + ': differ / tokens compared' for r in others)} |"
    )
    print("|---:|" + "---:|" * len(others))
    results = [compare_runs(reference, r, tolerances[0], tolerances)["sweep"] for r in others]
    for k, tol in enumerate(tolerances):
        cells = [f"{res[k]['differ']} / {res[k]['tokens_compared']:,}" for res in results]
        print(f"| {tol:g} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
