"""SGMV benchmark: lorafleet's Triton add_lora (and its shrink / expand halves) against torch baselines.

GPU time per call with host launch overhead excluded: every timed call is queued behind a spin
kernel, so the host has enqueued all repetitions before the GPU reaches them, and each call is
bracketed by CUDA events. The L2 cache is flushed before each call (a 256 MB write; `--flush read
--flush-mib 512`: a 512 MiB read). Reports the median, the bytes that must move (adapter weights of
the distinct slots touched + x + y read and written) over that time, and that as a percentage of
the device-to-device copy bandwidth measured in the same run. Compares against the best public
kernels' figures (issue 2's anchor table).

    python3 benchmarks/bench_sgmv.py --out DIR [--quick] [--sweep]
    python3 benchmarks/bench_sgmv.py --out DIR --sweep-only [--sweep-cases o4096:64:32:distinct,...]
        [--sweep-variants reread_64,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorafleet.kernels import add_lora_slices, sgmv_launch
from lorafleet.kernels.selfcheck import popularity_slots, segments_from_slots

H_IN = 4096
POOL = 512
DEVICE, DTYPE = "cuda", torch.bfloat16
SHAPES = {"o4096": (4096,), "qkv": (4096, 1024, 1024)}
POPULARITIES = ("identical", "distinct", "uniform", "skewed")
# Best public kernel, shrink+expand, microseconds (issue 2; H200, L2 flushed, median of 100).
ANCHORS: dict[tuple[str, int, int, str], float] = {}
for _pop, _vals in {
    "identical": (11.2, 12.7, 12.7, 13.5, 13.7, 13.0, 13.5, 14.4),
    "distinct": (11.2, 16.2, 20.6, 30.3, 49.9, 21.7, 55.3, 99.9),
    "uniform": (11.2, 15.0, 15.5, 19.7, 19.4, 19.1, 26.5, 30.0),
    "skewed": (11.2, 15.6, 16.0, 20.6, 23.0, 20.1, 26.6, 29.1),
}.items():
    for (_r, _t), _v in zip(
        ((16, 1), (16, 32), (16, 64), (16, 128), (16, 256), (64, 32), (64, 128), (64, 256)), _vals
    ):
        ANCHORS[("o4096", _r, _t, _pop)] = _v
ANCHORS.update(
    {
        ("qkv", 16, 256, "distinct"): 133.1,
        ("qkv", 16, 256, "uniform"): 25.7,
        ("qkv", 64, 256, "distinct"): 465.3,
        ("qkv", 64, 256, "uniform"): 45.4,
        ("o4096", 16, 4096, "prefill"): 59.3,
        ("o4096", 64, 4096, "prefill"): 90.2,
    }
)


class Timer:
    """Queues `reps` calls behind a spin kernel; returns per-call GPU times in microseconds.

    ``flush``: how the L2 is emptied before each call: "write" (a ``flush_mib`` MiB write, leaving
    dirty lines) or "read" (a read of as much, leaving clean lines)."""

    def __init__(self, flush: str = "write", flush_mib: int = 256) -> None:
        if flush not in ("write", "read"):
            raise ValueError(f"flush: expected 'write' or 'read', got {flush!r}")
        if flush_mib < 64:
            raise ValueError(f"flush_mib: at least 64 (the L2 is 50-60 MB), got {flush_mib}")
        self.flush_buf = torch.empty(flush_mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
        self.flush_sum = torch.empty((), dtype=torch.int64, device="cuda")
        self.flush = flush

    def flush_l2(self) -> None:
        if self.flush == "write":
            self.flush_buf.zero_()
        else:
            torch.sum(self.flush_buf.view(torch.int64), dim=0, out=self.flush_sum)

    def __call__(self, fn: Callable[[], None], reps: int) -> list[float]:
        fn()  # warm-up: compile, allocate
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        host_s = time.perf_counter() - t0
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        # Spin long enough (about 2 GHz clock, generous margin) for the host to queue everything.
        torch.cuda._sleep(int((reps * (host_s + 30e-6) * 2.0 + 2e-3) * 2e9))
        for i in range(reps):
            self.flush_l2()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def copy_bandwidth(timer: Timer) -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = statistics.median(timer(lambda: dst.copy_(src), 20))
    return 2 * n / (us * 1e-6) / 1e9


class Case:
    def __init__(self, shape: str, rank: int, T: int, popularity: str, gen: torch.Generator) -> None:
        self.shape, self.rank, self.T, self.popularity = shape, rank, T, popularity
        widths = SHAPES[shape]
        dt, dev = DTYPE, DEVICE
        base_pop = popularity.removesuffix("-padded")
        if popularity == "prefill":
            slots = torch.randperm(POOL, generator=gen)[:8].sort().values.tolist()
            token_slots = [s for s in slots for _ in range(T // 8)]
        else:
            token_slots = popularity_slots(base_pop, T, POOL, gen)
        indptr, seg = segments_from_slots(token_slots)
        self.distinct = len(set(seg))
        if popularity.endswith("-padded"):
            # The engine's graphs: one segment per batch slot whatever the popularity, the unused
            # ones empty with slot -1, so the kernels see T segments.
            pad = T - len(seg)
            indptr += [T] * pad
            seg += [-1] * pad
        self.x = torch.randn(T, H_IN, generator=gen).to(dev, dt)
        self.y = torch.randn(T, sum(widths), generator=gen).to(dev, dt)
        self.y_init = self.y.clone()
        self.a = [(torch.randn(POOL, rank, H_IN, device=dev, dtype=dt) / 64) for _ in widths]
        self.b = [(torch.randn(POOL, w, rank, device=dev, dtype=dt) / rank**0.5) for w in widths]
        self.ranks = torch.full((POOL,), rank, dtype=torch.int32, device=dev)
        self.scales = torch.full((POOL,), 0.5, dtype=torch.float32, device=dev)
        self.indptr = torch.tensor(indptr, dtype=torch.int32, device=dev)
        self.seg_slots = torch.tensor(seg, dtype=torch.int32, device=dev)
        self.token_slots = torch.tensor(token_slots, dtype=torch.long, device=dev)
        self.groups = [(indptr[i], indptr[i + 1], s) for i, s in enumerate(seg) if s >= 0]
        self.widths = widths
        self.rank_table = self.ranks.unsqueeze(0).expand(len(widths), -1)
        self.scale_table = self.scales.unsqueeze(0).expand(len(widths), -1)
        self.partials = sgmv_launch.shrink(
            self.x, self.a, self.indptr, self.seg_slots, self.rank_table, zero_fill=False
        )

    @property
    def weight_bytes(self) -> int:
        return self.distinct * sum(self.rank * (H_IN + w) for w in self.widths) * 2

    @property
    def io_bytes(self) -> int:
        return self.T * H_IN * 2 + 2 * self.T * sum(self.widths) * 2

    # --- variants ---
    def add_lora(self) -> None:
        add_lora_slices(
            self.y, self.x, self.a, self.b, self.indptr, self.seg_slots, ranks=self.ranks, scales=self.scales
        )

    def shrink(self) -> None:
        sgmv_launch.shrink(self.x, self.a, self.indptr, self.seg_slots, self.rank_table, zero_fill=False)

    def expand(self) -> None:
        sgmv_launch.expand(
            self.y, self.partials, self.b, self.indptr, self.seg_slots, self.rank_table, self.scale_table
        )

    def torch_loop(self) -> None:
        col = 0
        for a, b, w in zip(self.a, self.b, self.widths):
            for lo, hi, k in self.groups:
                self.y[lo:hi, col : col + w].add_((self.x[lo:hi] @ a[k].T) @ b[k].T, alpha=0.5)
            col += w

    def torch_gather_bmm(self) -> None:
        col = 0
        idx = self.token_slots
        for a, b, w in zip(self.a, self.b, self.widths):
            t = torch.bmm(self.x.unsqueeze(1), a[idx].transpose(1, 2))
            self.y[:, col : col + w] += 0.5 * torch.bmm(t, b[idx].transpose(1, 2)).squeeze(1)
            col += w


def parse_case(text: str) -> tuple[str, int, int, str]:
    """'shape:rank:T:popularity', e.g. 'o4096:16:64:distinct'."""
    fields = text.split(":")
    if len(fields) != 4:
        raise ValueError(f"{text!r} is not shape:rank:T:popularity")
    shape, rank, tokens, pop = fields
    if shape not in SHAPES or pop.removesuffix("-padded") not in (*POPULARITIES, "prefill"):
        raise ValueError(f"{text!r}: shape must be one of {list(SHAPES)}, popularity one of {POPULARITIES}")
    return shape, int(rank), int(tokens), pop


def check(case: Case) -> float:
    """Relative error of add_lora's update against gather-BMM's, from the case's initial y (timed
    calls keep accumulating into y)."""
    case.y.copy_(case.y_init)
    y0 = case.y_init
    case.torch_gather_bmm()
    ref = case.y.float().clone()
    case.y.copy_(y0)
    case.add_lora()
    out = case.y.float().clone()
    case.y.copy_(y0)
    return ((out - ref).norm() / (ref - y0.float()).norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for sgmv.json and sgmv.md")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--baseline-reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="anchor cases only")
    ap.add_argument("--sweep", action="store_true", help="also time launch-parameter variants")
    ap.add_argument("--sweep-only", action="store_true", help="time only the launch-parameter variants")
    ap.add_argument(
        "--sweep-cases", help="sweep these cases instead: shape:rank:T:popularity, comma-separated"
    )
    ap.add_argument("--sweep-variants", help="sweep only these variants (comma-separated names)")
    ap.add_argument(
        "--flush", choices=("write", "read"), default="write", help="how the L2 is emptied before each call"
    )
    ap.add_argument("--flush-mib", type=int, default=256, help="MiB written or read to empty the L2")
    args = ap.parse_args()
    cases = SWEEP_CASES
    if args.sweep_cases:
        try:
            cases = tuple(parse_case(c) for c in args.sweep_cases.split(","))
        except ValueError as e:
            ap.error(f"--sweep-cases: {e}")
    variants = SWEEP_VARIANTS
    if args.sweep_variants:
        names = ["default", *args.sweep_variants.split(",")]
        unknown = [k for k in names if k not in SWEEP_VARIANTS]
        if unknown:
            ap.error(f"--sweep-variants: unknown {unknown}; known: {sorted(SWEEP_VARIANTS)}")
        variants = {k: SWEEP_VARIANTS[k] for k in names}
    if not torch.cuda.is_available():
        print("bench_sgmv needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    timer = Timer(args.flush, args.flush_mib)
    bw = copy_bandwidth(timer)
    dev_name = torch.cuda.get_device_name()
    print(f"device {dev_name}; copy bandwidth {bw:.0f} GB/s (read+write)", flush=True)
    specs = [
        (s, r, t, p)
        for s in SHAPES
        for r in (8, 16, 32, 64)
        for t in (1, 8, 16, 32, 64, 128, 256)
        for p in POPULARITIES
    ]
    specs += [(s, r, 4096, "prefill") for s in SHAPES for r in (16, 64)]
    if args.quick:
        specs = [s for s in specs if s in ANCHORS]
    if args.sweep_only:
        specs = []
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, rank, T, pop in specs:
        case = Case(shape, rank, T, pop, gen)
        err = check(case)
        med = {}
        variants = ["add_lora", "shrink", "expand", "torch_loop"]
        if T * case.rank * H_IN * len(case.widths) <= 2**31:
            variants.append("torch_gather_bmm")
        for name in variants:
            reps = args.baseline_reps if name.startswith("torch") else args.reps
            med[name.removeprefix("torch_")] = statistics.median(timer(getattr(case, name), reps))
        total = case.weight_bytes + case.io_bytes
        gbs = total / (med["add_lora"] * 1e-6) / 1e9
        row = dict(
            shape=shape,
            rank=rank,
            T=T,
            popularity=pop,
            distinct=case.distinct,
            rel_err=err,
            bytes=total,
            gbs=gbs,
            pct_copy=100 * gbs / bw,
            anchor=ANCHORS.get((shape, rank, T, pop)),
            **{f"us_{k}": v for k, v in med.items()},
        )
        # The fastest other way measured or anchored: the public kernels' figures and the two
        # torch baselines of this run (the per-adapter matmul loop is Punica's plain baseline).
        others = [v for v in (row["anchor"], med["loop"], med.get("gather_bmm")) if v]
        row["best_other"] = min(others)
        rows.append(row)
        anchor = f" peer {row['anchor']:.1f}" if row["anchor"] else ""
        print(
            f"{shape:5s} r{rank:<3d} T={T:<5d} {pop:9s} add_lora {med['add_lora']:7.1f} us "
            f"(shrink {med['shrink']:6.1f} expand {med['expand']:6.1f}) loop {med['loop']:8.1f} "
            f"bmm {med.get('gather_bmm', float('nan')):8.1f} {gbs:6.0f} GB/s {row['pct_copy']:4.0f}%"
            f"{anchor} err {err:.1e}",
            flush=True,
        )
        del case
    sweep_rows = sweep(timer, gen, args.reps, cases, variants) if args.sweep or args.sweep_only else []
    summary = summarize(rows, bw)
    (args.out / "sgmv.json").write_text(
        json.dumps(
            dict(device=dev_name, copy_gbs=bw, rows=rows, sweep=sweep_rows, summary=summary, argv=sys.argv),
            indent=1,
        )
    )
    (args.out / "sgmv.md").write_text(markdown(rows, bw, dev_name, summary))
    print(json.dumps(summary, indent=1))
    return 0 if all(r["rel_err"] < 2e-2 for r in rows + sweep_rows) else 1


SWEEP_CASES = (
    ("o4096", 16, 1, "distinct"),
    ("o4096", 16, 32, "distinct"),
    ("o4096", 16, 64, "distinct"),
    ("o4096", 16, 32, "skewed"),
    ("o4096", 16, 128, "distinct"),
    ("o4096", 16, 256, "distinct"),
    ("o4096", 16, 256, "identical"),
    ("o4096", 16, 256, "uniform"),
    ("o4096", 64, 32, "distinct"),
    ("o4096", 64, 128, "distinct"),
    ("o4096", 64, 256, "distinct"),
    ("o4096", 64, 128, "identical"),
    ("o4096", 64, 256, "identical"),
    ("o4096", 64, 256, "uniform"),
    ("qkv", 64, 256, "uniform"),
    ("o4096", 64, 4096, "prefill"),
)

# Launch-parameter variants: overrides of sgmv_launch's module-level knobs (empty = the defaults).
SWEEP_VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "no_pdl": {"USE_PDL": False},
    "pdl_max_programs_2048": {"PDL_MAX_PROGRAMS": 2048},
    "pdl_max_programs_8192": {"PDL_MAX_PROGRAMS": 8192},
    "shrink_wide_r_bk256": {"SHRINK_BLOCK_K_WIDE_R": 256},
    "shrink_stages_4": {"SHRINK_NUM_STAGES": 4},
    "expand_always_wide": {"EXPAND_NARROW_BLOCK_N": 256, "EXPAND_NARROW_NUM_WARPS": 8},
    "expand_always_narrow": {"EXPAND_BLOCK_N": 128, "EXPAND_NUM_WARPS": 4},
    "expand_stages_2": {"EXPAND_NUM_STAGES": 2},
    "reread_64": {"REREAD_ROWS": 64},
    "reread_ranks_1024": {"REREAD_RANKS": 1024},
    "target_programs_264": {"_TARGET_PROGRAMS": 264},
    "target_programs_1056": {"_TARGET_PROGRAMS": 1056},
    "shrink_bk128": {"SHRINK_BLOCK_K": 128},
    "shrink_bk64": {"SHRINK_BLOCK_K": 64},
    # Row-wise expand (on by default from 64 rows at <= 1 row per segment and r_max <= 16).
    "rows_min_rows_1": {"ROWS_MIN_ROWS": 1},
    "rows_off": {"ROWS_MAX_AVG_ROWS": 0.0},
    "rows_avg4": {"ROWS_MAX_AVG_ROWS": 4.0},
    "rows_rank32": {"ROWS_MAX_RANK": 32},
    "rows_elems_4k": {"ROWS_EXPAND_ELEMS": 4096},
    "rows_elems_16k": {"ROWS_EXPAND_ELEMS": 16384},
    "rows_min_programs_528": {"ROWS_MIN_PROGRAMS": 528},
    "rows_min_programs_132": {"ROWS_MIN_PROGRAMS": 132},
    "rows_warps_8": {"ROWS_NUM_WARPS": 8},
}


def sweep(
    timer: Timer, gen: torch.Generator, reps: int, cases: tuple, variants: dict[str, dict[str, object]]
) -> list[dict]:
    """The whole add_lora under each variant of the launch parameters, to guide the defaults."""
    out = []
    for spec in cases:
        case = Case(*spec, gen)
        for name, overrides in variants.items():
            saved = {k: getattr(sgmv_launch, k) for k in overrides}
            for k, v in overrides.items():
                setattr(sgmv_launch, k, v)
            try:
                err = check(case)
                us = statistics.median(timer(case.add_lora, reps))
            finally:
                for k, v in saved.items():
                    setattr(sgmv_launch, k, v)
            out.append(dict(case=spec, variant=name, us=us, rel_err=err))
            print(f"sweep {spec} {name:24s} {us:7.1f} us err {err:.1e}", flush=True)
    return out


def summarize(rows: list[dict], bw: float) -> dict:
    anchored = [r for r in rows if r["anchor"]]
    ratios = [r["us_add_lora"] / r["anchor"] for r in anchored]
    worst = max(anchored, key=lambda r: r["us_add_lora"] / r["anchor"]) if anchored else None
    d256 = [
        r for r in rows if (r["shape"], r["rank"], r["T"], r["popularity"]) == ("o4096", 64, 256, "distinct")
    ]
    decode = [
        r
        for r in rows
        if r["shape"] == "o4096" and r["rank"] == 16 and r["T"] <= 64 and r["popularity"] in POPULARITIES
    ]
    others = [r["us_add_lora"] / r["best_other"] for r in rows if r.get("best_other")]
    worst_other = max(rows, key=lambda r: r["us_add_lora"] / r["best_other"]) if others else None
    return dict(
        geomean_vs_best_other=statistics.geometric_mean(others) if others else None,
        worst_vs_best_other=(worst_other["us_add_lora"] / worst_other["best_other"]) if worst_other else None,
        worst_other_case=(
            (worst_other["shape"], worst_other["rank"], worst_other["T"], worst_other["popularity"])
            if worst_other
            else None
        ),
        cases_over_1_1_vs_best_other=sum(x > 1.1 for x in others),
        geomean_vs_best_peer=statistics.geometric_mean(ratios) if ratios else None,
        worst_vs_best_peer=(worst["us_add_lora"] / worst["anchor"]) if worst else None,
        worst_case=(worst["shape"], worst["rank"], worst["T"], worst["popularity"]) if worst else None,
        distinct_r64_t256_pct_copy=d256[0]["pct_copy"] if d256 else None,
        decode_r16_t64_max_us=max(r["us_add_lora"] for r in decode) if decode else None,
        max_rel_err=max((r["rel_err"] for r in rows), default=None),
        copy_gbs=bw,
    )


def markdown(rows: list[dict], bw: float, dev: str, s: dict) -> str:
    out = [
        f"Device: {dev}; copy bandwidth {bw:.0f} GB/s (read+write, 1 GiB copy).",
        "",
        "| shape | rank | T | popularity | distinct | add_lora us | shrink us | expand us | loop us | "
        "gather-BMM us | GB/s | % copy | best peer us | ratio | vs best other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['us_add_lora'] / r['anchor']:.2f}" if r["anchor"] else ""
        out.append(
            f"| {r['shape']} | {r['rank']} | {r['T']} | {r['popularity']} | {r['distinct']} | "
            f"{r['us_add_lora']:.1f} | {r['us_shrink']:.1f} | {r['us_expand']:.1f} | {r['us_loop']:.1f} | "
            f"{r.get('us_gather_bmm', float('nan')):.1f} | {r['gbs']:.0f} | {r['pct_copy']:.0f} | "
            f"{r['anchor'] or ''} | {ratio} | {r['us_add_lora'] / r['best_other']:.2f} |"
        )
    out += ["", "Summary: " + json.dumps(s)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
