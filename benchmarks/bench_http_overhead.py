"""The HTTP (OpenAI-compatible) API against gRPC on the CPU demo fleet (issue 14's overhead target).

One command: it makes the demo model (once, under --out), starts one `lorafleet serve` (one CPU
worker, max_batch_size = --streams, gRPC and HTTP on free ports, metrics off), runs one short
warm-up per API, then --pairs pairs of the same `lorafleet bench` run (--streams streams sent at
once, --prompt-len prompt tokens, --output-len greedy new tokens each) through gRPC and through
`/v1/completions` with SSE (`--http`), the order alternating from pair to pair. It prints a markdown
table (tokens/s and p50 inter-token per API, per run and median, with the CPU seconds of the serve
process, of the rest of its process tree and of the bench client) and writes it to DIR/table.md,
with every run's figures in DIR/results.json.

    python benchmarks/bench_http_overhead.py --pairs 5 --out DIR

Target (issue 14): HTTP tokens/s within 5% of gRPC's, p50 inter-token within 1 ms of it. Linux
only (CPU seconds come from /proc); needs no network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from proc_tree import stat_fields, subtree

from lorafleet.sim.profiler import cpu_name

APIS = ("grpc", "http")
TOKENS_TARGET = 0.05  # HTTP tokens/s at most this fraction below gRPC's
ITL_TARGET_MS = 1.0  # HTTP p50 inter-token at most this much above gRPC's
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Run:
    pair: int
    api: str
    load_1min: float  # before the run
    tokens_per_s: float
    itl_p50_ms: float | None  # the bench's TPOT p50
    ttft_p50_ms: float | None
    completed: int
    requests: int
    errors: dict[str, int]
    head_cpu_s: float  # the `lorafleet serve` process: gRPC + HTTP + scheduler
    rest_cpu_s: float  # the rest of its process tree: the worker actor and Ray's daemons
    client_cpu_s: float  # the bench process, plan start to last stream's end (all threads)
    client_process_cpu_s: float  # the bench process from exec to exit (imports included)
    generated_tokens: int

    @property
    def ok(self) -> bool:
        return self.completed == self.requests and not self.errors


# ---------------------------------------------------------------------- processes


def tree_cpu_s(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of `root` and every process below it, by pid (Linux /proc)."""
    stats = stat_fields()
    tree = subtree(root, stats)
    return {pid: (int(stats[pid][11]) + int(stats[pid][12])) / CLK_TCK for pid in tree if pid in stats}


def cpu_delta(before: dict[int, float], after: dict[int, float], head: int) -> tuple[float, float]:
    """(head, rest of the tree) CPU seconds between two snapshots; new processes count from 0."""
    deltas = {pid: t - before.get(pid, 0.0) for pid, t in after.items()}
    return deltas.get(head, 0.0), sum(d for pid, d in deltas.items() if pid != head)


_READY = re.compile(r"lorafleet: serving .* on (\S+?); OpenAI API at (http://\S+?)/v1")


class Server:
    """One `lorafleet serve` subprocess; its stderr goes to a log file."""

    def __init__(self, model: Path, streams: int, log_path: Path, ready_timeout_s: float) -> None:
        args = ["--model", str(model), "--adapters-dir", str(model / "adapters"), "--workers", "1"]
        args += ["--engine", f"max_batch_size={streams}", "--port", "0", "--http-port", "0"]
        args += ["--metrics-port", "off", "--max-queue", str(4 * streams)]
        env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"lorafleet serve was not ready in {ready_timeout_s:.0f} s; see {log_path}"
                ) from None
            if line is None:
                self.stop()
                raise RuntimeError(f"lorafleet serve exited with {self.proc.returncode}; see {log_path}")
            match = _READY.search(line)
            if match:
                self.grpc, self.http = match.group(1), match.group(2)
                return

    def _pump(self, lines: queue.Queue[str | None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # read to the end, so that the server never blocks on a full pipe
            lines.put(line)
        self.proc.wait()
        lines.put(None)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # drains, stops its Ray and exits 0
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------- runs


def bench_args(args: argparse.Namespace, output_len: int) -> list[str]:
    """The `lorafleet bench` flags both APIs share."""
    cmd = ["--synthetic", "--popularity", "uniform", "--rate", "100000", "--duration", "1"]
    cmd += ["--max-requests", str(args.streams), "--prompt-len", str(args.prompt_len)]
    return [*cmd, "--output-len", str(output_len), "--json", "--no-progress"]


def bench_command(server: Server, api: str, args: argparse.Namespace, output_len: int) -> list[str]:
    cmd = [sys.executable, "-m", "lorafleet.cli", "bench", "--server", server.grpc]
    if api == "http":
        cmd += ["--http", server.http]
    return cmd + bench_args(args, output_len)


def run_bench(server: Server, api: str, args: argparse.Namespace, output_len: int, pair: int) -> Run:
    cmd = bench_command(server, api, args, output_len)
    load = os.getloadavg()[0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = tree_cpu_s(server.proc.pid)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout_s)
    after = tree_cpu_s(server.proc.pid)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    head, rest = cpu_delta(before, after, server.proc.pid)
    process_cpu = (children_after.ru_utime - children.ru_utime) + (
        children_after.ru_stime - children.ru_stime
    )

    def ms(value: float | None) -> float | None:
        return None if value is None else 1000.0 * value

    run = Run(
        pair=pair,
        api=api,
        load_1min=load,
        tokens_per_s=report["tokens_per_s"],
        itl_p50_ms=ms(report["tpot_s"]["p50"]),
        ttft_p50_ms=ms(report["ttft_s"]["p50"]),
        completed=report["completed"],
        requests=report["requests"],
        errors=report["errors"],
        head_cpu_s=head,
        rest_cpu_s=rest,
        client_cpu_s=report["client_cpu_s"],
        client_process_cpu_s=process_cpu,
        generated_tokens=report["generated_tokens"],
    )
    return run


# ---------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per API: the medians over its successful runs."""
    out: dict[str, dict[str, float]] = {}
    for api in APIS:
        mine = [r for r in runs if r.api == api and r.ok]
        out[api] = {
            "runs": len(mine),
            "tokens_per_s": median([r.tokens_per_s for r in mine]),
            "itl_p50_ms": median([r.itl_p50_ms for r in mine if r.itl_p50_ms is not None]),
            "head_cpu_s": median([r.head_cpu_s for r in mine]),
            "rest_cpu_s": median([r.rest_cpu_s for r in mine]),
            "client_cpu_s": median([r.client_cpu_s for r in mine]),
            "client_us_per_token": median([1e6 * r.client_cpu_s / r.generated_tokens for r in mine]),
        }
    return out


def paired_gaps(runs: list[Run]) -> tuple[list[float], list[float]]:
    """Per pair where both runs succeeded: HTTP/gRPC - 1 of tokens/s, and HTTP - gRPC p50 ITL (ms)."""
    ratios, itl = [], []
    for pair in sorted({r.pair for r in runs}):
        by_api = {r.api: r for r in runs if r.pair == pair and r.ok}
        if len(by_api) == 2:
            ratios.append(by_api["http"].tokens_per_s / by_api["grpc"].tokens_per_s - 1.0)
            g, h = by_api["grpc"].itl_p50_ms, by_api["http"].itl_p50_ms
            if g is not None and h is not None:
                itl.append(h - g)
    return ratios, itl


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:,.{digits}f}"


def markdown(runs: list[Run], meta: dict[str, object]) -> str:
    med = summary(runs)
    lines = [
        f"- machine: {meta['cpu']}, {meta['cores']} cores; load average (1 min) before each run: "
        + ", ".join(f"{r.load_1min:.1f}" for r in runs),
        f"- date: {meta['date']}; Python {meta['python']}; {meta['versions']}",
        f"- command: `{meta['command']}`",
        f"- each run: `{meta['bench']}`",
        "",
        f"| API | tokens/s ({len(runs) // 2} runs) | median | p50 inter-token, ms | median "
        "| head CPU s | rest CPU s | client CPU s | client us/token |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for api in APIS:
        mine = [r for r in runs if r.api == api]
        m = med[api]
        lines.append(
            f"| {'gRPC' if api == 'grpc' else 'HTTP'} "
            f"| {' / '.join(_fmt(r.tokens_per_s, 0) if r.ok else 'failed' for r in mine)} "
            f"| {_fmt(m['tokens_per_s'], 0)} "
            f"| {' / '.join(_fmt(r.itl_p50_ms) if r.ok else 'failed' for r in mine)} "
            f"| {_fmt(m['itl_p50_ms'])} | {_fmt(m['head_cpu_s'], 2)} | {_fmt(m['rest_cpu_s'], 2)} "
            f"| {_fmt(m['client_cpu_s'], 2)} | {_fmt(m['client_us_per_token'], 0)} |"
        )
    ratios, itl = paired_gaps(runs)
    gap = med["http"]["tokens_per_s"] / med["grpc"]["tokens_per_s"] - 1.0
    itl_gap = med["http"]["itl_p50_ms"] - med["grpc"]["itl_p50_ms"]
    met = gap >= -TOKENS_TARGET and itl_gap <= ITL_TARGET_MS
    lines += [
        "",
        f"HTTP against gRPC, medians: tokens/s {100 * gap:+.1f}% (target: no worse than "
        f"-{100 * TOKENS_TARGET:.0f}%), p50 inter-token {itl_gap:+.2f} ms (target: at most "
        f"+{ITL_TARGET_MS:.0f} ms): **{'met' if met else 'not met'}**.",
        "Per pair: tokens/s "
        + ", ".join(f"{100 * r:+.1f}%" for r in ratios)
        + f" (median {100 * median(ratios):+.1f}%); p50 inter-token "
        + ", ".join(f"{d:+.2f}" for d in itl)
        + f" ms (median {median(itl):+.2f} ms).",
    ]
    failed = [r for r in runs if not r.ok]
    if failed:
        lines.append(
            "Failed runs (left out of the medians): "
            + "; ".join(f"pair {r.pair} {r.api}: {r.completed}/{r.requests}, {r.errors}" for r in failed)
        )
    return "\n".join(lines) + "\n"


def machine() -> dict[str, object]:
    cpu = cpu_name()
    versions = []
    for name in ("torch", "grpcio", "uvicorn", "h11", "ray"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:  # not installed: say so rather than fail the benchmark
            versions.append(f"{name} ?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# ---------------------------------------------------------------------- main


def ensure_demo(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        cmd = [sys.executable, "-m", "lorafleet.cli", "make-demo", str(folder)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=5, help="gRPC/HTTP run pairs (default 5)")
    p.add_argument("--out", type=Path, required=True, help="folder for the demo model, logs and results")
    p.add_argument("--streams", type=int, default=64, help="concurrent streams = batch size (default 64)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request (default 16)")
    p.add_argument("--output-len", type=int, default=256, help="new tokens per request (default 256)")
    p.add_argument("--model", type=Path, default=None, help="a demo model folder (default: made in --out)")
    p.add_argument("--run-timeout-s", type=float, default=300.0, help="limit of one bench run")
    p.add_argument("--ready-timeout-s", type=float, default=180.0, help="wait this long for the server")
    args = p.parse_args(argv)
    for name in ("pairs", "streams", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.output_len < 2:
        p.error("--output-len must be at least 2 (inter-token latency needs two tokens)")
    if not Path("/proc/self/stat").exists():
        p.error("this benchmark reads CPU times from /proc: run it on Linux")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or ensure_demo(args.out / "demo")
    meta = machine()
    meta["command"] = " ".join(["python", "benchmarks/bench_http_overhead.py", *(argv or sys.argv[1:])])
    shared = " ".join(bench_args(args, args.output_len))
    meta["bench"] = f"lorafleet bench --server HOST:PORT [--http http://HOST:HTTP_PORT] {shared}"
    server = Server(model, args.streams, args.out / "serve.log", args.ready_timeout_s)
    runs: list[Run] = []
    try:
        for api in APIS:  # adapters loaded, connections and code paths warm, before anything counts
            run_bench(server, api, args, output_len=8, pair=-1)
        for pair in range(args.pairs):
            for api in APIS if pair % 2 == 0 else APIS[::-1]:
                run = run_bench(server, api, args, args.output_len, pair)
                runs.append(run)
                print(
                    f"pair {pair} {api:4}: {run.tokens_per_s:7.0f} tokens/s, p50 inter-token "
                    f"{_fmt(run.itl_p50_ms)} ms, client {run.client_cpu_s:.2f} CPU-s, "
                    f"head {run.head_cpu_s:.2f} CPU-s, load {run.load_1min:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        exit_code = server.stop()
    table = markdown(runs, meta)
    (args.out / "table.md").write_text(table)
    results = {"meta": meta, "runs": [asdict(r) for r in runs], "medians": summary(runs)}
    results["server_exit_code"] = exit_code
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
