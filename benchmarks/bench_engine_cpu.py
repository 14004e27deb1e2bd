"""Engine throughput on the CPU with the tiny demo model and 8 distinct adapters.

For each batch size B, B requests (adapters assigned round-robin over the 8, so B >= 8 mixes all of
them in every step) with 32-token prompts generate 64 tokens each (greedy, ignore_eos). Reports
generated tokens per second over the whole run (prefill included) and the mean decode step time.

    .venv/bin/python benchmarks/bench_engine_cpu.py [--append-docs]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafleet.sim.profiler import cpu_name
from lorafleet.worker import Engine, SamplingParams
from lorafleet.worker.demo_assets import make_demo

PROMPT_LEN = 32
NEW_TOKENS = 64
NUM_ADAPTERS = 8


def run(engine: Engine, batch: int, repeats: int) -> tuple[float, float]:
    """Best of ``repeats``: (generated tokens/s, mean seconds per decode step) for ``batch`` requests."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 300, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]
    adapters = [f"adapter-{i % NUM_ADAPTERS}" for i in range(batch)]
    sp = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate(prompts, adapters=adapters, sampling=sp)  # warm-up: adapters resident, caches hot
    real_step = engine.step
    best: tuple[float, float] = (0.0, 0.0)
    for _ in range(repeats):
        step_times: list[float] = []

        def timed_step(step_times: list[float] = step_times):
            t = time.perf_counter()
            out = real_step()
            step_times.append(time.perf_counter() - t)
            return out

        engine.step = timed_step  # type: ignore[method-assign]
        t0 = time.perf_counter()
        outs = engine.generate(prompts, adapters=adapters, sampling=sp)
        seconds = time.perf_counter() - t0
        engine.step = real_step  # type: ignore[method-assign]
        tokens = sum(len(o.token_ids) for o in outs)
        decode = step_times[1:]  # the first step is the prefill of every prompt
        result = (tokens / seconds, sum(decode) / max(len(decode), 1))
        best = max(best, result)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch size; best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--append-docs", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_engine_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo(Path(tmp) / "demo", num_adapters=NUM_ADAPTERS, seed=0)
        rows = []
        for batch in args.batch_sizes:
            engine = Engine.from_pretrained(demo.model_dir, max_batch_size=batch, max_loras=NUM_ADAPTERS)
            for name, path in demo.adapters.items():
                engine.add_adapter(name, path)
            tok_s, step_s = run(engine, batch, args.repeats)
            distinct = min(batch, NUM_ADAPTERS)
            rows.append(f"| {batch} | {distinct} | {tok_s:,.0f} | {step_s * 1e3:.2f} |")
    table = "\n".join(
        [
            "| batch | distinct adapters | generated tokens/s | decode step (ms) |",
            "|---:|---:|---:|---:|",
            *rows,
        ]
    )
    machine = f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    header = (
        f"Tiny demo model (2 layers, hidden 64, GQA 4/2, vocab 384), float32, {PROMPT_LEN}-token prompts, "
        f"{NEW_TOKENS} new tokens each, greedy; adapters round-robin over {NUM_ADAPTERS} of mixed ranks "
        "and targets. Tokens/s counts generated tokens over the whole run (prefill included); best of "
        f"{args.repeats} runs (the CPU is shared with other jobs, so single runs are noisy)."
    )
    print(f"command: {command.strip()}\nmachine: {machine}\n\n{table}")
    if args.append_docs:
        docs = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        docs.parent.mkdir(exist_ok=True)
        section = (
            f"\n## Worker engine (CPU)\n\n{header}\n\n- machine: {machine}\n"
            f"- date: {datetime.date.today().isoformat()}\n- command: `{command.strip()}`\n\n{table}\n"
        )
        with docs.open("a", encoding="utf-8") as f:
            f.write(section)
        print(f"appended to {docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
