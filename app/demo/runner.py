"""`lorafleet demo`: the whole system on this machine, in one command and under a minute.

Makes the tiny demo model and its adapters once (cached), starts a local Ray with CPU workers
behind the gRPC server, measures what one worker sustains here, and sizes a quiet / burst / quiet
workload from that figure, so the fleet's story shows on a slow machine as on a fast one: one
worker while quiet, more for the burst, then migrations and a release back to one. It replays the
workload through gRPC with a progress line, checks the story, prints the timeline phase by phase,
writes the run as JSON and PNG, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.demo.config import DemoConfig
from lorafleet.demo.config import add_arguments as add_demo_arguments

if TYPE_CHECKING:
    from lorafleet.bench.runner import BenchReport
    from lorafleet.bench.workload import PlannedRequest
    from lorafleet.demo.calibrate import Calibration
    from lorafleet.demo.story import Machine, Phase

DEMO_ADAPTERS = 8


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorafleet" / "demo"


def ensure_demo_assets(cache_dir: Path) -> tuple[Path, Path]:
    """The demo model folder and its adapters folder, made on first use (atomically: no half copies)."""
    from lorafleet.worker.demo_assets import ensure_chat_template, make_demo

    adapters = cache_dir / "adapters"
    if (cache_dir / "config.json").is_file() and adapters.is_dir():
        ensure_chat_template(cache_dir)  # caches made before the HTTP API had no chat template
        return cache_dir, adapters
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise ValueError(f"{cache_dir} exists but holds no demo model; remove it or pick another --cache-dir")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_dir.parent))
    try:
        make_demo(staging, num_adapters=DEMO_ADAPTERS, overwrite=True)
        try:
            if cache_dir.exists():
                cache_dir.rmdir()
            staging.rename(cache_dir)
        except OSError:
            # Another demo made it first; use theirs if it is complete.
            if not (cache_dir / "config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return cache_dir, adapters


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_demo_arguments(p)


async def run_demo(cfg: DemoConfig) -> int:
    from lorafleet.bench.progress import ProgressBar
    from lorafleet.bench.runner import WorkerSample, run_bench
    from lorafleet.bench.workload import phased_workload
    from lorafleet.client.grpc_client import AsyncClient
    from lorafleet.config import ServeConfig
    from lorafleet.demo.calibrate import calibrate, wait_idle
    from lorafleet.demo.story import Machine, demo_phases, phase_of
    from lorafleet.serving.serve import shutdown_serving, start_serving

    started = time.monotonic()
    machine = Machine.here()  # before our own workers add to the load: what others put on it
    cache = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    say(f"demo model and {DEMO_ADAPTERS} adapters in {cache}")
    model_dir, adapters_dir = ensure_demo_assets(cache)
    config = ServeConfig(
        model=str(model_dir),
        adapters_dir=str(adapters_dir),
        workers=cfg.workers,
        max_workers=cfg.workers,
        port=0,
        metrics_port=0,
        http_port=0,
        policy=cfg.policy,
        consolidation_interval_s=cfg.consolidation_interval_s,
        idle_release_s=cfg.idle_release_s,
        engine={"max_batch_size": cfg.max_batch_size, "max_loras": 4},
    )
    say(f"starting a local Ray and {cfg.workers} CPU workers ({machine.cores} cores here) ...")
    api = await start_serving(config)
    try:
        say(
            f"serving on {api.address}; OpenAI API at http://{api.host}:{api.http_port}/v1; "
            f"metrics at http://{api.host}:{api.metrics_port}/metrics"
        )
        async with AsyncClient(api.address) as client:
            await client.wait_ready(30.0)
            say(
                f"measuring what one worker sustains ({cfg.calibration_s:g} s, "
                f"a batch of {cfg.max_batch_size}) ..."
            )
            cal = await calibrate(
                client,
                seconds=cfg.calibration_s,
                concurrency=cfg.max_batch_size,
                prompt_len=cfg.prompt_len,
                output_len=cfg.output_len,
                popularity=cfg.popularity,
                seed=cfg.seed,
            )
            say(
                f"one worker sustains {cal.tokens_per_s:.0f} tokens/s, "
                f"about {cal.requests_per_s:.1f} requests/s of this workload (slices spread {cal.spread:.0%})"
            )
            if cal.max_busy_workers > 1:
                say(f"note: {cal.max_busy_workers} workers ran during the calibration: it may overstate one")
            await wait_idle(client, 30.0)
            phases = demo_phases(cfg, cal.requests_per_s)
            plan = phased_workload(
                [(p.rate_rps, p.end_s - p.start_s) for p in phases],
                popularity=cfg.popularity,
                prompt_len=cfg.prompt_len,
                output_len=cfg.output_len,
                seed=cfg.seed,
            )
            say(
                f"sending {len(plan)} requests: quiet {phases[0].rate_rps:.1f} req/s for {cfg.quiet_s:g} s, "
                f"a burst of {phases[1].rate_rps:.1f} req/s for {cfg.burst_s:g} s, then quiet for "
                f"{cfg.cooldown_s:g} s ({cfg.popularity} adapter popularity)"
            )
            say(
                f"the {cfg.workers} workers stay up through the burst (a cold CPU worker takes seconds to "
                f"start); after it, a worker idle for {cfg.idle_release_s:g} s is released, down to 1"
            )
            progress = ProgressBar(len(plan), label="demo") if cfg.progress else None

            def on_sample(sample: WorkerSample) -> None:
                if progress is not None:
                    progress.set_status(
                        f"{phase_of(phases, sample.t_s).name:<8} workers busy {sample.busy}/{sample.active}  "
                        f"queue {sample.queue_len}"
                    )

            def allow_release() -> None:
                api.fleet.set_worker_bounds(min_workers=1)

            def on_start() -> None:
                asyncio.get_running_loop().call_later(phases[1].end_s, allow_release)

            report = await run_bench(
                client,
                plan,
                seed=cfg.seed,
                request_timeout_s=120.0,
                progress=progress,
                on_sample=on_sample,
                on_start=on_start,
            )
            if progress is not None:
                progress.close()
    finally:
        say("shutting down ...")
        await shutdown_serving(api, drain_timeout_s=30.0)
    return finish(cfg, machine, cal, phases, plan, report, time.monotonic() - started)


def finish(
    cfg: DemoConfig,
    machine: Machine,
    cal: Calibration,
    phases: list[Phase],
    plan: list[PlannedRequest],
    report: BenchReport,
    wall_s: float,
) -> int:
    """Check the story, write the JSON and the PNG, print the report; the exit status."""
    from lorafleet.bench.report import format_bench
    from lorafleet.demo.plot import write_plot
    from lorafleet.demo.report import format_phases, format_story, format_timeline, run_summary
    from lorafleet.demo.story import check_story, quiet_ttft_p50, summarize_phases, timeline

    samples = report.workers_over_time
    slices = timeline(samples, phases, cfg.slice_s)
    summaries = summarize_phases(phases, plan, report.records, samples)
    ttft_quiet = quiet_ttft_p50(phases, plan, report.records)
    checks = check_story(cfg, cal, summaries, samples, ttft_quiet, machine)
    story_ok = all(c.ok for c in checks)
    json_path, png_path = cfg.out_dir / "demo-run.json", cfg.out_dir / "demo-run.png"
    title = (
        f"lorafleet demo: {cfg.workers} CPU workers on {machine.cores} cores, one worker "
        f"{cal.tokens_per_s:.0f} tokens/s; story {'shown' if story_ok else 'NOT shown'}"
    )
    files = {"json": str(json_path)}
    if samples:
        write_plot(png_path, samples, phases, workers=cfg.workers, title=title)
        files["png"] = str(png_path)
    summary = run_summary(
        config=cfg,
        machine=machine,
        calibration=cal,
        phases=phases,
        report=report,
        summaries=summaries,
        slices=slices,
        checks=checks,
        ttft_quiet_p50_s=ttft_quiet,
        wall_s=wall_s,
        files=files,
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    print()
    print(
        f"lorafleet demo: {cfg.workers} CPU workers on {machine.cores} cores (load average "
        f"{machine.load_avg_1m:.1f} at the start), tiny Llama, {DEMO_ADAPTERS} LoRA adapters + aliases"
    )
    print(
        f"calibration: one worker sustains {cal.tokens_per_s:.0f} tokens/s "
        f"({cal.requests_per_s:.1f} requests/s of this workload)"
    )
    print(format_bench(report))
    print()
    print(format_phases(summaries))
    print()
    print(format_timeline(slices, cfg.slice_s))
    print()
    print(format_story(checks))
    print(f"run written to {json_path}" + (f" and {png_path}" if "png" in files else ""))
    print(f"total demo time {wall_s:.1f} s")
    if cfg.json:
        print(json.dumps(summary))
    return 0 if story_ok and report.completed == report.requests else 1


_STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - _STARTED:4.1f}s] {message}", file=sys.stderr, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    return asyncio.run(run_demo(DemoConfig.from_args(args)))
