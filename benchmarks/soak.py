"""Soak: a real `lorafleet serve` (CPU, demo model) under bursts of 10x its capacity, with cancels
and adapter churn, for --duration seconds.

Checks, and prints as one JSON object (the last line):
- every request either completes, is cancelled by this client, or fails with a gRPC status and a
  message; none is lost (no stream may outlive --request-timeout-s);
- the resident memory of the server and of its Ray workers stays flat: the least-squares slope of
  RSS over the second half of the run, in MB per minute (the first half is warm-up);
- /metrics agrees with the client: requests by final status, as the server counted them, equal the
  client's counts of the same outcomes.
Exit status 1 when a check fails.

    python benchmarks/soak.py --duration 1800 --out DIR      # the 30-minute soak
    python benchmarks/soak.py --duration 120                  # a short one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from soak_memory import probe_report, role_report, slope_mb_per_min, tree_rss_by_role

from lorafleet.client.grpc_client import ApiError, AsyncClient
from lorafleet.demo.runner import default_cache_dir, ensure_demo_assets

# gRPC status (as the client sees it) -> the label the server's request counter uses.
STATUS_LABELS = {
    "OK": "ok",
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
    "INVALID_ARGUMENT": "invalid_argument",
    "NOT_FOUND": "not_found",
    "RESOURCE_EXHAUSTED": "resource_exhausted",
    "UNAVAILABLE": "unavailable",
    "INTERNAL": "internal",
}
BATCH = 4  # per worker: the fleet's capacity is workers x BATCH streams


def start_server(
    model: Path, adapters: Path, workers: int, probe_env: dict[str, str]
) -> tuple[subprocess.Popen, str, int]:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", **probe_env}
    args = ["--model", str(model), "--adapters-dir", str(adapters), "--workers", str(workers)]
    args += ["--port", "0", "--metrics-port", "0", "--http-port", "off"]
    args += ["--max-queue", str(4 * workers * BATCH)]
    args += ["--engine", f"max_batch_size={BATCH}", "--idle-release-s", "5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if " on 127.0.0.1:" in line:
            address = line.split(" on ")[1].split(";")[0].strip()
            metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, address, metrics_port
    raise RuntimeError(f"lorafleet serve exited with {proc.wait()} before it was ready")


def scrape_requests(metrics_port: int) -> Counter[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        match = re.match(r"lorafleet_requests_total\{(.*)\} ([0-9.e+]+)$", line)
        if match:
            status = re.search(r'status="([a-z_]+)"', match.group(1))
            if status:
                counts[status.group(1)] += int(float(match.group(2)))
    return counts


class Soak:
    def __init__(
        self, client: AsyncClient, names: list[str], paths: list[str], args: argparse.Namespace
    ) -> None:
        self.client, self.names, self.paths, self.args = client, names, paths, args
        self.rng = random.Random(args.seed)
        self.outcomes: Counter[str] = Counter()  # server-visible final status, client's view
        self.failures: Counter[str] = Counter()  # status: first message seen
        self.lost: list[str] = []
        self.started = 0
        self.tasks: set[asyncio.Task] = set()

    async def one(self, i: int) -> None:
        adapter = self.rng.choice([None, *self.names, "churn-0", "churn-1"])
        cancel = self.rng.random() < 0.1
        # A stream to cancel is long: a short one can finish on the server (counted "ok" there)
        # before this busy client reads its first chunk and cancels (counted "cancelled" here).
        max_new = self.rng.randrange(200, 400) if cancel else self.rng.randrange(4, 48)
        sampling = {"max_new_tokens": max_new, "ignore_eos": True}
        prompt = [self.rng.randrange(3, 300) for _ in range(self.rng.randrange(2, 40))]
        try:
            async with asyncio.timeout(self.args.request_timeout_s):
                stream = self.client.stream(
                    prompt, adapter=adapter, sampling=sampling, request_id=f"soak-{i}"
                )
                async for chunk in stream:
                    if cancel and not chunk.finished:
                        await stream.aclose()  # leaving the stream cancels the call
                        self.outcomes["cancelled"] += 1
                        return
                # Read to the end of the stream (its status), as Client.generate does.
                self.outcomes["ok"] += 1
        except ApiError as exc:
            label = STATUS_LABELS.get(exc.code.name, exc.code.name.lower())
            self.outcomes[label] += 1
            if not exc.details:
                self.failures[f"{label} without a message"] += 1
        except TimeoutError:
            self.lost.append(f"soak-{i}")

    async def churn(self, stop: asyncio.Event) -> None:
        """Register, re-point, unregister and re-register two alias names while requests use them."""
        k = 0
        while not stop.is_set():
            name = f"churn-{k % 2}"
            first, second = self.paths[k % len(self.paths)], self.paths[(k + 1) % len(self.paths)]
            for target in (first, None, second):  # register, unregister, register elsewhere
                try:
                    if target is None:
                        await self.client.unregister_adapter(name)
                    else:
                        await self.client.register_adapter(name, target)
                except ApiError as exc:  # FAILED_PRECONDITION while in use, NOT_FOUND after a race
                    self.failures[f"churn {exc.code.name}"] += 1
                await asyncio.sleep(0.3)
            k += 1

    async def run(self) -> None:
        stop = asyncio.Event()
        churn = asyncio.create_task(self.churn(stop))
        end = time.monotonic() + self.args.duration
        capacity = self.args.workers * BATCH
        while time.monotonic() < end:
            # A burst of 10x the fleet's capacity, then a pause long enough to drain part of it.
            for _ in range(10 * capacity):
                task = asyncio.create_task(self.one(self.started))
                self.started += 1
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(self.rng.uniform(2.0, 6.0))
        stop.set()
        await churn
        if self.tasks:
            await asyncio.wait(self.tasks)


async def main_async(args: argparse.Namespace) -> dict:
    model, adapters = ensure_demo_assets(args.cache_dir or default_cache_dir())
    names = sorted(p.name for p in adapters.iterdir() if (p / "adapter_config.json").is_file())
    probe_env: dict[str, str] = {}
    if args.memory_probe is not None:
        probe_env = {
            "LORAFLEET_MEMORY_PROBE": str(args.memory_probe),
            "LORAFLEET_MEMORY_PROBE_INTERVAL_S": str(args.rss_interval_s * 3),
            "LORAFLEET_MEMORY_PROBE_FRAMES": str(args.tracemalloc_frames),
        }
    proc, address, metrics_port = start_server(model, adapters, args.workers, probe_env)
    rss: list[tuple[float, dict[str, float]]] = []
    t0 = time.monotonic()
    try:
        async with AsyncClient(address, timeout=args.request_timeout_s) as client:
            await client.wait_ready(120)
            soak = Soak(client, names, [str(adapters / n) for n in names], args)
            sampler_stop = threading.Event()

            def sample() -> None:
                while not sampler_stop.wait(args.rss_interval_s):
                    rss.append((time.monotonic() - t0, tree_rss_by_role(proc.pid)))

            threading.Thread(target=sample, daemon=True).start()
            await soak.run()
            sampler_stop.set()
            await asyncio.sleep(2.0)  # the server finishes counting the last streams
            server = scrape_requests(metrics_port)
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    half = [(t, sum(v.values())) for t, v in rss if t >= args.duration / 2]
    client_counts = {k: v for k, v in soak.outcomes.items() if v}
    server_counts = {k: v for k, v in server.items() if v}
    summary = {
        "duration_s": args.duration,
        "requests": soak.started,
        "outcomes": client_counts,
        "server_requests_by_status": server_counts,
        "metrics_match": client_counts == server_counts,
        "lost": len(soak.lost),
        "lost_ids": soak.lost[:10],
        "failures_without_reason": {k: v for k, v in soak.failures.items() if "without" in k},
        "churn_refusals": {k: v for k, v in soak.failures.items() if k.startswith("churn")},
        "rss_mb_first": round(sum(rss[0][1].values()), 1) if rss else None,
        "rss_mb_last": round(sum(rss[-1][1].values()), 1) if rss else None,
        "rss_slope_mb_per_min": slope_mb_per_min(half),
        "rss_by_role": role_report(rss, args.duration),
        "server_exit_code": proc.returncode,
    }
    summary["ok"] = (
        summary["lost"] == 0
        and summary["metrics_match"]
        and not summary["failures_without_reason"]
        and (
            summary["rss_slope_mb_per_min"] != summary["rss_slope_mb_per_min"]  # NaN: too short
            or summary["rss_slope_mb_per_min"] < args.max_slope_mb_per_min
        )
        and proc.returncode == 0
    )
    if args.memory_probe is not None:
        summary["head_probe"] = probe_report(args.memory_probe)
        workers = sorted(args.memory_probe.glob("worker-*"))
        summary["worker_probes"] = {d.name: probe_report(d) for d in workers}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rss.jsonl").write_text("".join(json.dumps({"t_s": t, **v}) + "\n" for t, v in rss))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--rss-interval-s", type=float, default=10.0)
    parser.add_argument("--max-slope-mb-per-min", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write soak.json and rss.jsonl here")
    parser.add_argument(
        "--memory-probe",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the server with its memory probe writing to DIR (lorafleet.memory_probe; slows it)",
    )
    parser.add_argument(
        "--tracemalloc-frames",
        type=int,
        default=0,
        help="with --memory-probe: trace allocations with this many frames (0 = off)",
    )
    args = parser.parse_args()
    summary = asyncio.run(main_async(args))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
