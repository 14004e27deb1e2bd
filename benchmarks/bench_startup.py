"""Engine start-up by phase (GPU): ``graph_capture="start"`` against ``"idle"``, and the idle captures.

On the 7B shape with random weights built in-process (so no disk load is timed), one engine per
entry of ``--modes``, built and freed in turn: the first one compiles (or loads from Triton's disk
cache) every kernel variant, so in the default ``start,idle,start`` the last two are the warm pair
to compare. Each engine's phases come from ``Engine.startup`` (what its log lines say). For the idle
engine, the graphs left for idle moments are then captured one ``run_idle_work`` call at a time:
the longest of those calls is the most a request arriving mid-capture waits. Last, a prefill step
of ``--prefill-tokens`` rows with an adapter, timed before those captures (eager: its bucket had no
graph) and after (its graph), shows the steady state comes back.

    python3 benchmarks/bench_startup.py --out DIR [--shape llama2-7b] [--modes start,idle,start]

Writes DIR/startup.json and DIR/startup.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from engine_shapes import fill_pool, make_engine, model_config, random_model
from profile_engine import time_prefill

from lorafleet.worker.engine import Engine
from lorafleet.worker.graph_schedule import GRAPH_CAPTURE_MODES
from lorafleet.worker.startup_timing import capture_digest

# The profile's engine (sim/profiles/h200-llama2-7b.yaml): its start-up went from 22 s to 36 s.
ENGINE = {"max_batch_size": 64, "max_loras": 16, "max_num_batched_tokens": 2048, "max_model_len": 4096}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def start_engine(model, config, mode: str) -> tuple[Engine, dict]:
    sync()
    t0 = time.perf_counter()
    options = dict(ENGINE, max_model_len=min(ENGINE["max_model_len"], config.max_position_embeddings))
    if model.device.type == "cpu":
        options["kv_cache_bytes"] = 64 << 20  # a dry run: the CPU default (1 GiB) takes seconds to zero
    engine = make_engine(model, config, graph_capture=mode, **options)
    wall = time.perf_counter() - t0
    runner = engine.runner
    row = {
        "mode": mode,
        "wall_s": wall,
        "phases": dict(engine.startup.seconds),
        "families": capture_digest(t for t in runner.capture_timings if t.at == "start"),
        "graphs_at_start": len(runner.capture_timings),
        "graphs_left_for_idle": len(runner.schedule.pending()),
        "kv_blocks": engine.allocator.num_blocks,
    }
    print(f"{mode}: start-up {wall:.2f} s; " + ", ".join(f"{k} {v:.2f} s" for k, v in row["phases"].items()))
    for kind, fam in row["families"].items():
        print(f"  {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in fam.items()), flush=True)
    return engine, row


def idle_captures(engine: Engine) -> dict:
    """Every graph left for idle moments, one run_idle_work call each, timed per call."""
    calls = []
    while engine.has_idle_work():
        t0 = time.perf_counter()
        if not engine.run_idle_work():
            break
        calls.append(time.perf_counter() - t0)
    timings = [t for t in engine.runner.capture_timings if t.at == "idle"]
    per_graph = [{**dataclasses.asdict(t), "key": list(t.key), "call_s": c} for t, c in zip(timings, calls)]
    out = {
        "graphs": len(calls),
        "total_s": sum(calls),
        "longest_call_s": max(calls, default=0.0),
        "error": engine.runner.idle_capture_error,
        "per_graph": per_graph,
    }
    print(
        f"idle captures: {out['graphs']} graphs, {out['total_s']:.2f} s in all, longest call "
        f"{out['longest_call_s']:.3f} s, error {out['error']}",
        flush=True,
    )
    return out


def prefill_ms(engine: Engine, tokens: int, tag: str) -> dict:
    before = (engine.runner.num_mixed_graph_steps, engine.runner.num_uncaptured_steps)
    times = time_prefill(engine, tokens, 0, tag, random.Random(0))
    after = (engine.runner.num_mixed_graph_steps, engine.runner.num_uncaptured_steps)
    row = {
        "ms_warm": statistics.median(times[2:]) * 1e3,
        "ms_all": [round(t * 1e3, 2) for t in times],
        "graph_steps": after[0] - before[0],
        "uncaptured_steps": after[1] - before[1],
    }
    print(f"prefill {tokens} rows with an adapter, {tag}: {row}", flush=True)
    return row


def markdown(result: dict) -> str:
    runs = result["runs"]
    phases = list(dict.fromkeys(p for r in runs for p in r["phases"]))
    lines = [
        f"{result['gpu']}, {result['date']}, shape {result['shape']}, engine {result['engine']}",
        "",
        "| phase | " + " | ".join(f"{i + 1}: {r['mode']}" for i, r in enumerate(runs)) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for p in phases:
        cells = [f"{r['phases'][p]:.2f}" if p in r["phases"] else "" for r in runs]
        lines.append(f"| {p} s | " + " | ".join(cells) + " |")
    lines.append("| **engine wall s** | " + " | ".join(f"**{r['wall_s']:.2f}**" for r in runs) + " |")
    lines.append("| graphs at start-up | " + " | ".join(str(r["graphs_at_start"]) for r in runs) + " |")
    for kind in ("prefill", "decode"):
        for part in ("warmup_s", "first_warmup_s", "capture_s", "prep_s"):
            cells = [f"{r['families'][kind][part]:.2f}" if kind in r["families"] else "" for r in runs]
            lines.append(f"| {kind} graphs: {part} | " + " | ".join(cells) + " |")
    idle = result.get("idle")
    if idle:
        lines += [
            "",
            f"Idle captures: {idle['graphs']} graphs in {idle['total_s']:.2f} s, the longest call "
            f"{idle['longest_call_s'] * 1e3:.0f} ms (error: {idle['error']}).",
        ]
    pre = result.get("prefill")
    if pre:
        lines.append(
            f"Prefill of {result['prefill_tokens']} rows with an adapter: "
            f"{pre['before']['ms_warm']:.2f} ms before the idle captures (eager steps "
            f"{pre['before']['uncaptured_steps']}), {pre['after']['ms_warm']:.2f} ms after (graph steps "
            f"{pre['after']['graph_steps']})."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--modes", default="start,idle,start", help="one engine per entry, in order")
    p.add_argument("--prefill-tokens", type=int, default=1025, help="rows of the timed prefill step")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no graphs to capture)")
    args = p.parse_args()
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in GRAPH_CAPTURE_MODES]
    if bad:
        p.error(f"--modes: {bad[0]!r} is not one of {GRAPH_CAPTURE_MODES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_startup.py needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    config = model_config(args.shape)
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    model = random_model(config, dtype=torch.bfloat16 if cuda else torch.float32, device=args.device)
    sync()
    build_s = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name() if cuda else "CPU (dry run)"
    print(f"{gpu}: random {args.shape} weights built in {build_s:.1f} s", flush=True)
    result: dict = {
        "gpu": gpu,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": args.shape,
        "engine": ENGINE,
        "model_build_s": build_s,
        "prefill_tokens": args.prefill_tokens,
        "runs": [],
    }
    for i, mode in enumerate(modes):
        engine, row = start_engine(model, config, mode)
        result["runs"].append(row)
        # The idle run that follows a first (compiling) run: its steps and captures are warm too.
        if mode == "idle" and "idle" not in result and (i > 0 or len(modes) == 1):
            fill_pool(engine.lora_pool, [16])
            engine._overlap = False  # each step timed on its own
            before = prefill_ms(engine, args.prefill_tokens, "before-idle-captures")
            result["idle"] = idle_captures(engine)
            after = prefill_ms(engine, args.prefill_tokens, "after-idle-captures")
            result["prefill"] = {"before": before, "after": after}
        # Freed before the next engine sizes its KV cache from the free memory.
        engine.adapters.close()
        del engine
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        (args.out / "startup.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (args.out / "startup.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
