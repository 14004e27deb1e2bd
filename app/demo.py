"""`lorafleet demo`: the whole system on this machine, in one command and about a minute.

Makes the tiny demo model and its adapters once (cached), starts a local Ray with CPU workers
behind the gRPC server, replays a short synthetic multi-adapter workload through gRPC with a
progress bar, prints a summary, and shuts everything down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lorafleet.scheduler.fleet_config import POLICIES
from lorafleet.workload import POPULARITIES

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
    p.add_argument(
        "--cache-dir", type=Path, default=None, help=f"where the demo model lives ({default_cache_dir()})"
    )
    p.add_argument("--workers", type=int, default=3, help="CPU workers (default 3)")
    p.add_argument(
        "--rate", type=float, default=3.0, help="quiet-phase requests/s; the burst sends 10x (default 3)"
    )
    p.add_argument("--phase-s", type=float, default=4.0, help="length of each of the 3 phases (default 4 s)")
    p.add_argument(
        "--popularity", choices=POPULARITIES, default="skewed", help="adapter mix (default skewed)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="packing", choices=POLICIES)
    p.add_argument("--no-progress", action="store_true")


async def run_demo(args: argparse.Namespace) -> int:
    from lorafleet.bench import run_bench
    from lorafleet.client import AsyncClient
    from lorafleet.config import ServeConfig
    from lorafleet.progress import ProgressBar
    from lorafleet.report import format_bench
    from lorafleet.serve import shutdown_serving, start_serving
    from lorafleet.workload import phased_workload

    if not args.rate > 0 or not args.phase_s > 0:
        raise ValueError("--rate and --phase-s must be > 0")
    started = time.monotonic()
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    say(f"demo model and {DEMO_ADAPTERS} adapters in {cache}")
    model_dir, adapters_dir = ensure_demo_assets(cache)
    config = ServeConfig(
        model=str(model_dir),
        adapters_dir=str(adapters_dir),
        workers=args.workers,
        max_workers=args.workers,
        port=0,
        metrics_port=0,
        http_port=0,
        policy=args.policy,
        # Short intervals so a one-minute run shows consolidation at work.
        consolidation_interval_s=1.0,
        idle_release_s=60.0,
        engine={"max_batch_size": 4, "max_loras": 4},
    )
    say(f"starting a local Ray and {args.workers} CPU workers ...")
    api = await start_serving(config)
    try:
        say(
            f"serving on {api.address}; OpenAI API at http://{api.host}:{api.http_port}/v1; "
            f"metrics at http://{api.host}:{api.metrics_port}/metrics"
        )
        # Quiet, burst, quiet: the burst spills onto more workers, the packing policy gathers the
        # load back onto few once it passes.
        phases = [(args.rate, args.phase_s), (10 * args.rate, args.phase_s), (args.rate, args.phase_s)]
        plan = phased_workload(
            phases, popularity=args.popularity, prompt_len=(8, 48), output_len=(32, 160), seed=args.seed
        )
        async with AsyncClient(api.address) as client:
            await client.wait_ready(30.0)
            say(
                f"sending {len(plan)} requests: {args.rate:g} req/s, a burst of {10 * args.rate:g} req/s, "
                f"then {args.rate:g} req/s again ({args.popularity} adapter popularity)"
            )
            progress = None if args.no_progress else ProgressBar(len(plan), label="demo")
            report = await run_bench(client, plan, seed=args.seed, request_timeout_s=120.0, progress=progress)
            if progress is not None:
                progress.close()
    finally:
        say("shutting down ...")
        await shutdown_serving(api, drain_timeout_s=30.0)
    print()
    print(f"lorafleet demo: {args.workers} CPU workers, tiny Llama, {DEMO_ADAPTERS} LoRA adapters + aliases")
    print(format_bench(report))
    print(f"total demo time {time.monotonic() - started:.1f} s")
    return 0 if report.completed == report.requests else 1


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run_cli(args: argparse.Namespace) -> int:
    return asyncio.run(run_demo(args))
