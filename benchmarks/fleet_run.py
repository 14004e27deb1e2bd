"""One run of bench_fleet.py: a `lorafleet serve` with one policy, warmed up, then the trace slice
replayed by `lorafleet bench` (its parser, plan builder and `run_bench`, in this process so that the
status samples, the requests and a kill share one clock), optionally with a worker SIGKILLed
mid-burst. Returns the run record that fleet_report.py summarizes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet_server import ServeProcess, StatusSample, sample_status
from fleet_tokens import top_gap

from lorafleet.bench import cli_flags
from lorafleet.bench import runner as bench
from lorafleet.bench.workload import TraceRow, percentile
from lorafleet.client.grpc_client import AsyncClient
from lorafleet.demo.calibrate import calibrate, wait_idle
from lorafleet.serving.api_types import GenerateChunk


@dataclass(frozen=True)
class RunSpec:
    name: str
    policy: str
    kill: bool
    serve_args: list[str]  # everything but --policy
    bench_args: list[str]  # `lorafleet bench` flags but --server and --phases
    max_batch_size: int
    warmup_s: float
    # An untimed closed loop before the warm-up, on the first run: kernels compile for new shapes
    # (Triton's cache then serves the later servers) and adapters load, so the figure is steady state.
    prewarm_s: float
    tail_s: float  # sampling goes on this long after the plan's last arrival
    sample_every_s: float
    serve_timeout_s: float
    kill_min_running: int = 1  # the kill waits for a worker holding this many sequences
    # Replay only the plan's first requests (the kill pair, fleet_pair.py); None: the whole plan.
    max_requests: int | None = None


@dataclass(frozen=True)
class Warmup:
    seconds: float
    tokens_per_s: float  # one worker running a full batch of trace-like lengths (median of slices)
    spread: float
    # The mean over the same slices (the stalls of prefill steps count, which a median of half-second
    # slices can leave out), and the most workers seen busy: the kill pair's sizing reads these.
    mean_tokens_per_s: float | None = None
    busy_workers: int = 1


# Given the first warm-up (one worker's capacity) and the server's start time: the --phases text.
ChoosePhases = Callable[[Warmup, float], str]
# Given the run's warm-up, its server's start time, the plan's send times and the burst's start:
# (how many of the plan's first requests to replay, the replay's deadline in time.monotonic()).
SizePrefix = Callable[[Warmup, float, list[float], float], tuple[int, float]]


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet bench", add_help=False)
    cli_flags.add_arguments(parser)
    return parser


def length_ranges(rows: list[TraceRow], prompt_cap: int, output_cap: int) -> tuple[tuple[int, int], ...]:
    """Uniform ranges with the trace slice's mean clamped lengths, for the warm-up's closed loop."""
    head = rows[:2000]
    prompt = statistics.fmean(max(1, min(r.context_tokens, prompt_cap)) for r in head)
    output = statistics.fmean(max(1, min(r.generated_tokens, output_cap)) for r in head)
    return (max(1, round(prompt / 2)), round(1.5 * prompt)), (max(1, round(output / 2)), round(1.5 * output))


def choose_victim(sample: StatusSample | None, min_running: int) -> tuple[int, int] | None:
    """(pid, sequences) of the worker to kill: the active worker running the most sequences, once it
    runs at least `min_running` and a second active worker can take its requests; else None."""
    if sample is None:
        return None
    active = [
        (n, pid) for n, pid, state in zip(sample.running, sample.pids, sample.states) if state == "active"
    ]
    if len(active) < 2:
        return None
    running, pid = max(active)
    if running < min_running or pid <= 0:
        return None
    return pid, running


async def _kill_in_burst(
    server: ServeProcess,
    samples: list[StatusSample],
    t0: list[float],
    burst: tuple[float, float],
    min_running: int,
    out: dict[str, Any],
) -> None:
    """SIGKILL the worker holding the most sequences once it holds `min_running` in the burst (by
    the burst's end, whichever holds any). Its pid comes from the status RPC and must be a worker
    process of this server: nothing else is ever killed."""
    while not t0:
        await asyncio.sleep(0.05)
    seen = 0
    while True:
        await asyncio.sleep(0.02)
        if len(samples) == seen:
            continue
        seen = len(samples)
        now = time.monotonic() - t0[0]
        last = samples[-1]
        if now < burst[0]:
            continue
        choice = choose_victim(last, min_running if now < burst[1] else 1)
        if choice is not None and choice[0] in server.worker_pids():
            break
    pid, held = choice
    os.kill(pid, signal.SIGKILL)
    out.update(
        at_s=time.monotonic() - t0[0],
        pid=pid,
        victim_running=held,
        workers_at_kill=len(last.running),
        running_at_kill=sum(last.running),
        sample_age_s=time.monotonic() - last.t,
    )


async def run_one(
    spec: RunSpec,
    rows: list[TraceRow],
    out_dir: Path,
    *,
    phases: str | None,
    choose_phases: ChoosePhases | None,
    burst_of: Callable[[str], tuple[float, float, float]],
    deadline: float,
    size_prefix: SizePrefix | None = None,
) -> dict[str, Any]:
    """The run record; `phases` fixed, or chosen by `choose_phases` after the first warm-up.

    `burst_of(phases)` gives (burst start, burst end, plan seconds). `deadline` (time.monotonic())
    bounds the replay: requests still running then are "unfinished", and the run record says so.
    `size_prefix`, after the warm-up, replaces `spec.max_requests` and `deadline` (the kill pair's
    reference sizes itself from its own warm-up's speed).
    """
    server = await asyncio.to_thread(
        ServeProcess.start,
        [*spec.serve_args, "--policy", spec.policy],
        out_dir / f"serve-{spec.name}.log",
        spec.serve_timeout_s,
    )
    record: dict[str, Any] = {"name": spec.name, "policy": spec.policy, "serve_started_s": server.started_s}
    try:
        async with AsyncClient(server.address) as client:
            await client.wait_ready(30.0)
            status = await client.status(timeout=10.0)
            prompt_cap = int(_flag(spec.bench_args, "--max-prompt-tokens"))
            output_cap = int(_flag(spec.bench_args, "--max-new-tokens"))
            prompt_len, output_len = length_ranges(rows, prompt_cap, output_cap)
            loop = {
                "concurrency": spec.max_batch_size,
                "prompt_len": prompt_len,
                "output_len": output_len,
                "popularity": "skewed",
                "seed": 0,
            }
            if spec.prewarm_s > 0:
                with contextlib.suppress(ValueError):  # only warms: a stalled slice is no failure
                    await calibrate(client, seconds=spec.prewarm_s, **loop)
            try:
                cal = await calibrate(client, seconds=spec.warmup_s, **loop)
                mean = statistics.fmean(cal.slice_tokens_per_s)
                warm = Warmup(cal.seconds, cal.tokens_per_s, cal.spread, mean, cal.max_busy_workers)
            except ValueError:
                if phases is None:
                    raise  # the first warm-up sizes the workload: without a figure there is no plan
                warm = Warmup(spec.warmup_s, 0.0, 0.0)  # a later run's warm-up only warms
            record["warmup"] = asdict(warm)
            if phases is None:
                assert choose_phases is not None
                phases = choose_phases(warm, server.started_s)
            await wait_idle(client, 300.0)
            args = bench_parser().parse_args(
                [*spec.bench_args, "--server", server.address, "--phases", phases]
            )
            record["bench_command"] = "lorafleet bench " + " ".join(
                [*spec.bench_args, "--server", server.address, "--phases", phases]
            )
            plan, clamped = cli_flags.build_plan(args, status.model.max_context_tokens, rows)
            whole = plan  # a prefix maps its adapters as the whole plan does (run_bench's adapters_of)
            burst_start, burst_end, plan_s = burst_of(phases)
            max_requests = spec.max_requests
            if size_prefix is not None:
                arrivals = [p.at_s for p in plan]
                max_requests, deadline = size_prefix(warm, server.started_s, arrivals, burst_start)
            if max_requests is not None:
                if not 0 < max_requests <= len(plan):
                    raise ValueError(f"max_requests {max_requests} is not in 1..{len(plan)}")
                # The prefix ends sending at its last arrival: the kill's by-the-burst's-end rule and
                # the window follow it.
                record["plan_requests"] = len(plan)
                whole, plan = plan, plan[:max_requests]
                plan_s = min(plan_s, plan[-1].at_s)
                burst_end = min(burst_end, plan_s)
            window_s = plan_s + spec.tail_s
            record.update(phases=phases, burst=[burst_start, burst_end], plan_s=plan_s, window_s=window_s)
            await _replay(spec, server, client, args, plan, record, (burst_start, burst_end), deadline, whole)
            record["bench"]["clamped"] = clamped
    finally:
        stopping = time.monotonic()
        record["serve_exit"] = await asyncio.to_thread(server.stop)
        record["serve_stop_s"] = time.monotonic() - stopping
    return record


async def _replay(
    spec: RunSpec,
    server: ServeProcess,
    client: AsyncClient,
    args: argparse.Namespace,
    plan: list[Any],
    record: dict[str, Any],
    burst: tuple[float, float],
    deadline: float,
    whole: list[Any] | None = None,
) -> None:
    samples: list[StatusSample] = []
    t0: list[float] = []
    sampler = asyncio.create_task(sample_status(client, samples, spec.sample_every_s))
    kill: dict[str, Any] = {}
    killer = None
    if spec.kill:
        killer = asyncio.create_task(_kill_in_burst(server, samples, t0, burst, spec.kill_min_running, kill))
    gaps: dict[int, list[float]] = {}
    requests: list[bench.RequestRecord] = []
    report = None
    try:
        report = await asyncio.wait_for(
            bench.run_bench(
                client,
                plan,
                seed=args.seed,
                request_timeout_s=args.request_timeout,
                sample_every_s=1.0,  # the bench's own sampler: ours samples more finely
                allow_aliases=args.aliases,
                records_out=requests,
                on_start=lambda: t0.append(time.monotonic()),
                send=top_gap_sender(client, gaps),
                adapters_of=whole,
            ),
            max(1.0, deadline - time.monotonic()),
        )
        # Keep sampling to the window's end: the release of the second GPU may come after the replay.
        rest = t0[0] + record["window_s"] - time.monotonic()
        if rest > 0:
            await asyncio.sleep(min(rest, max(0.0, deadline - time.monotonic())))
    except asyncio.TimeoutError:
        record["error"] = "the run reached the benchmark's time budget before its requests finished"
    finally:
        for task in (sampler, killer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    start = t0[0] if t0 else time.monotonic()
    record["samples"] = [{**asdict(s), "t": s.t - start} for s in samples]
    record["kill"] = kill or None
    record["requests"] = [_request_json(r, start, gaps.get(id(r))) for r in requests]
    if report is not None:
        summary = asdict(report)
        for key in ("records", "workers_over_time"):
            summary.pop(key, None)
        record["bench"] = summary
    else:
        record["bench"] = _partial_summary(record["requests"])


def top_gap_sender(client: AsyncClient, gaps: dict[int, list[float]]) -> bench.Send:
    """`lorafleet bench`'s greedy request, asking also for each token's top two candidates: the gap
    between their logprobs (per record, by id) is what the decisive-step comparison reads."""

    def keep(record: bench.RequestRecord, chunk: GenerateChunk) -> None:
        mine = gaps.setdefault(id(record), [])
        mine.extend(round(top_gap(top), 5) for top in chunk.top_logprobs or ())

    return bench.grpc_sender(client, sampling={"logprobs": True, "top_logprobs": 2}, on_chunk=keep)


def _request_json(r: bench.RequestRecord, start: float, gaps: list[float] | None) -> dict[str, Any]:
    def rel(x: float | None) -> float | None:
        return None if x is None else x - start

    sent = r.sent_at if r.sent_at > 0 else None  # records start at 0.0 until sent
    return {
        "adapter": r.adapter,
        "prompt_len": r.prompt_len,
        "sent": rel(sent),
        "first": rel(r.first_token_at),
        "done": rel(r.done_at),
        "last": rel(r.last_token_at),  # TPOT's end (fleet_stats.py)
        "tokens": r.tokens,
        "status": request_status(r),
        "error": r.error,
        "token_ids": r.token_ids,
        # One per token, or None (the sender did not get alternatives for every token).
        "top_gaps": gaps if gaps is not None and len(gaps) == len(r.token_ids) else None,
    }


def request_status(r: bench.RequestRecord) -> str:
    """The record's status, with the requests the time budget cut off as "unfinished" (sent) or
    "unsent": the first GPU float32 pair recorded its 11 cut-off requests as "ok" with no tokens
    (the cancelled stream kept the record's default status) and compared them."""
    if r.sent_at <= 0:
        return "unsent"
    if r.done_at is None or r.status == "cancelled":
        return "unfinished"
    if r.status == "ok" and not r.token_ids:
        # Every bench request asks for at least one token and ignores EOS: a completed one has some.
        return "unfinished"
    return r.status


def _partial_summary(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Enough of the bench summary for the report when the replay was cut off."""
    ok = [r for r in requests if r["status"] == "ok"]
    errors: dict[str, int] = {}
    for r in requests:
        if r["status"] != "ok":
            errors[r["status"]] = errors.get(r["status"], 0) + 1
    # The latencies of the requests that did complete: a pair run cut off near its end still has
    # most of them (the first GPU kill run: 81 of 86), which the report would otherwise show as "–".
    ttft = [r["first"] - r["sent"] for r in ok if r["first"] is not None]
    tpot = [
        (r["last"] - r["first"]) / (r["tokens"] - 1)
        for r in ok
        if r["tokens"] > 1 and r["first"] is not None and r["last"] is not None
    ]
    return {
        "requests": len(requests),
        "completed": len(ok),
        "errors": errors,
        "requests_per_s": 0.0,
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 90, 99)},
        "tpot_s": {f"p{q}": percentile(tpot, q) for q in (50, 90, 99)},
    }


def _flag(argv: list[str], name: str) -> str:
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        raise ValueError(f"bench arguments lack {name}") from None
