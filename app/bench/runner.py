"""`lorafleet bench`: an open-loop load generator against a lorafleet server.

Each planned request is sent at its arrival time (never waiting for earlier ones), streamed to the
end, and timed: TTFT = first token - send, TPOT = (last token - first token) / (tokens - 1).
A poller samples GetClusterStatus to record how many workers were in use over time.
With `--http URL` the requests go through the OpenAI-compatible HTTP API instead (http_sender.py);
the control calls stay on gRPC. The command's flags and the plan they describe are cli_flags.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lorafleet.bench.cli_flags import build_plan
from lorafleet.bench.progress import ProgressBar
from lorafleet.bench.trace_phases import parse_phases
from lorafleet.bench.workload import PlannedRequest, percentile, prompt_token_ids, read_azure_trace
from lorafleet.client.flags import client_kwargs
from lorafleet.client.grpc_client import ApiError, AsyncClient
from lorafleet.serving.api_types import GenerateChunk
from lorafleet.worker.types import FinishReason

ALIAS_PREFIX = "bench-"


@dataclass
class RequestRecord:
    adapter: str | None
    prompt_len: int
    sent_at: float
    first_token_at: float | None = None
    last_token_at: float | None = None
    done_at: float | None = None
    tokens: int = 0
    # "ok", "aborted", "incomplete", "cancelled" (cut off by the caller) or the gRPC status name, lower case
    status: str = "ok"
    error: str = ""
    # What the stream delivered (gRPC sender only), so runs of one plan can be compared token for token.
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerSample:
    t_s: float
    active: int  # workers taking requests
    busy: int  # workers running at least one sequence
    running: int
    queue_len: int
    # The fleet's totals at this moment (since it started), so a timeline can place them in time.
    migrations: int = 0
    workers_released: int = 0


@dataclass
class BenchReport:
    requests: int
    completed: int
    errors: dict[str, int]
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    workers_over_time: list[WorkerSample] = field(default_factory=list)
    max_busy_workers: int = 0
    mean_busy_workers: float = 0.0
    migrations: int = 0
    preemptions: int = 0
    adapters_used: int = 0
    clamped: int = 0
    first_errors: list[str] = field(default_factory=list)
    # CPU seconds this process (every thread: grpc's C core polls on its own) used from the plan's
    # time 0 to the last stream's end: the load generator's own cost, which shares the machine.
    client_cpu_s: float = 0.0
    # Per request, in plan order: for callers that slice the run (the demo's phases); not in the JSON.
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    def to_json(self) -> str:
        summary = asdict(self)
        del summary["records"]
        return json.dumps(summary)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def summarize(
    records: list[RequestRecord], wall_s: float, samples: list[WorkerSample], counters: dict[str, int]
) -> BenchReport:
    ok = [r for r in records if r.status == "ok"]
    ttft = [r.first_token_at - r.sent_at for r in ok if r.first_token_at is not None]
    tpot = [
        (r.last_token_at - r.first_token_at) / (r.tokens - 1)
        for r in ok
        if r.tokens > 1 and r.first_token_at is not None and r.last_token_at is not None
    ]
    e2e = [r.done_at - r.sent_at for r in ok if r.done_at is not None]
    tokens = sum(r.tokens for r in records)
    busy = [s.busy for s in samples]
    return BenchReport(
        requests=len(records),
        completed=len(ok),
        errors=dict(Counter(r.status for r in records if r.status != "ok")),
        wall_s=wall_s,
        generated_tokens=tokens,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_s=_quantiles(ttft),
        tpot_s=_quantiles(tpot),
        e2e_s=_quantiles(e2e),
        workers_over_time=samples,
        max_busy_workers=max(busy, default=0),
        mean_busy_workers=sum(busy) / len(busy) if busy else 0.0,
        migrations=counters.get("migrations", 0),
        preemptions=counters.get("preemptions", 0),
        adapters_used=len({r.adapter for r in records}),
        first_errors=[f"{r.status}: {r.error}" for r in records if r.status != "ok"][:5],
        records=records,
    )


async def _resolve_adapters(
    client: AsyncClient, plan: list[PlannedRequest], allow_aliases: int, use_base: bool
) -> tuple[dict[int, str | None], list[str]]:
    """Logical adapter index -> registered name; registers aliases of existing adapters if needed.

    Returns the mapping and the aliases registered (to unregister afterwards).
    """
    needed = sorted({p.adapter_index for p in plan})
    if use_base:
        return dict.fromkeys(needed), []
    registered = await client.list_adapters()
    names = sorted(n for n in registered if not n.startswith(ALIAS_PREFIX))
    if not names:
        raise ValueError("the server has no adapters registered; register some or pass --base-model")
    mapping: dict[int, str | None] = {}
    aliases: list[str] = []
    for rank, index in enumerate(needed):
        if rank < len(names):
            mapping[index] = names[rank]
        elif rank - len(names) < allow_aliases:
            # Another name for an existing adapter's files: a distinct adapter to the cache.
            alias = f"{ALIAS_PREFIX}{rank}"
            try:
                await client.register_adapter(alias, registered[names[rank % len(names)]])
            except ApiError as exc:
                if exc.code.name != "PERMISSION_DENIED":
                    raise
                # Aliases are registrations, an admin's call: say how to run with a client token.
                raise ValueError(
                    f"the workload needs {len(needed)} adapters and {len(names)} are registered; "
                    "registering aliases needs an admin token (or pass --aliases 0 to reuse adapters)"
                ) from None
            aliases.append(alias)
            mapping[index] = alias
        else:
            mapping[index] = names[rank % len(names)]
    return mapping, aliases


# Sends one planned request and fills its record: (record, prompt, max_new_tokens, timeout_s).
Send = Callable[[RequestRecord, list[int], int, float], Awaitable[None]]


# Sees every chunk a request's stream delivers (e.g. to keep its logprobs).
OnChunk = Callable[[RequestRecord, GenerateChunk], None]


def grpc_sender(
    client: AsyncClient, *, sampling: Mapping[str, Any] | None = None, on_chunk: OnChunk | None = None
) -> Send:
    """Greedy requests over gRPC; `sampling` adds fields (e.g. logprobs), `on_chunk` sees each chunk."""

    async def send(record: RequestRecord, prompt: list[int], max_new_tokens: int, timeout_s: float) -> None:
        await _one_request(client, record, prompt, max_new_tokens, timeout_s, sampling, on_chunk)

    return send


async def _one_request(
    client: AsyncClient,
    record: RequestRecord,
    prompt: list[int],
    max_new_tokens: int,
    timeout_s: float,
    extra: Mapping[str, Any] | None = None,
    on_chunk: OnChunk | None = None,
) -> None:
    sampling = {**(extra or {}), "max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    record.sent_at = time.monotonic()
    finish: FinishReason | None = None
    try:
        async for chunk in client.stream(
            prompt, adapter=record.adapter, sampling=sampling, timeout=timeout_s
        ):
            now = time.monotonic()
            if chunk.token_ids:
                if record.first_token_at is None:
                    record.first_token_at = now
                record.last_token_at = now
                record.tokens += len(chunk.token_ids)
                record.token_ids.extend(chunk.token_ids)
            if on_chunk is not None:
                on_chunk(record, chunk)
            finish = chunk.finish_reason
        # Only a stream that ends with STOP or LENGTH is a completed request.
        if finish is None:
            record.status, record.error = "incomplete", "the stream ended without a finish reason"
        elif finish is FinishReason.ABORT:
            record.status, record.error = "aborted", "the server aborted the request"
    except ApiError as exc:
        record.status = exc.code.name.lower()
        record.error = exc.details
    except asyncio.CancelledError:
        # The caller stopped waiting (a deadline, Ctrl-C): the `finally` below still stamps done_at,
        # so without this the record would keep its default "ok" with whatever tokens had arrived.
        record.status, record.error = "cancelled", "the client stopped waiting before the stream ended"
        raise
    finally:
        record.done_at = time.monotonic()


async def _sample_workers(
    client: AsyncClient,
    start: float,
    out: list[WorkerSample],
    every_s: float,
    on_sample: Callable[[WorkerSample], None] | None,
) -> None:
    while True:
        try:
            st = await client.status(timeout=5.0)
        except ApiError:
            st = None  # a missed sample is not worth failing the run over
        if st is not None:
            sample = WorkerSample(
                t_s=time.monotonic() - start,
                active=st.workers_in("active"),
                busy=st.num_busy_workers,
                running=sum(w.num_running for w in st.workers),
                queue_len=st.queue_len,
                migrations=st.counters.migrations,
                workers_released=st.counters.workers_released,
            )
            out.append(sample)
            if on_sample is not None:
                on_sample(sample)
        await asyncio.sleep(every_s)


async def run_bench(
    client: AsyncClient,
    plan: list[PlannedRequest],
    *,
    seed: int = 0,
    request_timeout_s: float = 300.0,
    sample_every_s: float = 0.1,
    allow_aliases: int = 256,
    use_base: bool = False,
    progress: ProgressBar | None = None,
    records_out: list[RequestRecord] | None = None,
    on_sample: Callable[[WorkerSample], None] | None = None,
    on_start: Callable[[], None] | None = None,
    send: Send | None = None,
    adapters_of: list[PlannedRequest] | None = None,
) -> BenchReport:
    """Send `plan` against the server behind `client` (or through `send`); returns the summary.

    `records_out`, if given, receives the per-request records in plan order (the simulator's
    validation replays exactly what was sent); `on_sample` sees every worker sample as it is taken;
    `on_start` runs at the plan's time 0. `adapters_of`: the plan whose adapters are mapped onto the
    registered ones (default `plan`): a run of a prefix of a plan then sends each request to the
    adapter the whole plan's run does (the mapping goes by rank among the adapters a plan uses, so a
    prefix's own would differ).
    """
    if not plan:
        raise ValueError("the workload is empty: raise --rate or --duration")
    status = await client.status(timeout=10.0)
    vocab = status.model.vocab_size
    before = status.counters
    mapping, aliases = await _resolve_adapters(client, adapters_of or plan, allow_aliases, use_base)
    rng = random.Random(seed)
    prompts = [prompt_token_ids(p.prompt_len, vocab, rng) for p in plan]
    records = [RequestRecord(mapping[p.adapter_index], p.prompt_len, 0.0) for p in plan]
    if records_out is not None:
        records_out.extend(records)
    samples: list[WorkerSample] = []
    send = send or grpc_sender(client)
    start, cpu_start = time.monotonic(), time.process_time()
    if on_start is not None:
        on_start()
    sampler = asyncio.create_task(_sample_workers(client, start, samples, sample_every_s, on_sample))
    tasks: list[asyncio.Task[None]] = []
    try:
        for p, record, prompt in zip(plan, records, prompts):
            delay = start + p.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(record, prompt, p.max_new_tokens, request_timeout_s))
            if progress is not None:
                task.add_done_callback(lambda _t, r=record: progress.advance(r.tokens, r.status != "ok"))
            tasks.append(task)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        wall = time.monotonic() - start
        client_cpu = time.process_time() - cpu_start
        for alias in aliases:
            # Still in use or already gone: the server keeps serving either way.
            with contextlib.suppress(ApiError):
                await client.unregister_adapter(alias, timeout=10.0)
    after = (await client.status(timeout=10.0)).counters
    counters = {
        "migrations": after.migrations - before.migrations,
        "preemptions": after.preemptions - before.preemptions,
    }
    report = summarize(records, wall, samples, counters)
    report.client_cpu_s = client_cpu
    return report


# ---------------------------------------------------------------------- CLI


async def _bench_main(args: argparse.Namespace, out: TextIO) -> BenchReport:
    from lorafleet.bench.report import format_bench

    rows = read_azure_trace(args.trace) if args.trace else None  # a bad file fails before connecting
    if args.phases is not None:
        parse_phases(args.phases)  # so does a bad --phases
    if args.servegen is not None and not Path(args.servegen).is_dir():
        raise ValueError(f"ServeGen folder {args.servegen!r} does not exist")  # and a missing --servegen
    async with contextlib.AsyncExitStack() as stack:
        auth = client_kwargs(args)
        client = await stack.enter_async_context(AsyncClient(args.server, **auth))
        await client.wait_ready(args.connect_timeout)
        status = await client.status(timeout=10.0)
        send = None
        if args.http is not None:
            from lorafleet.bench.http_sender import base_url, http_sender
            from lorafleet.client.sse_client import HttpClientError, SseClient

            headers = {"Authorization": f"Bearer {auth['token']}"} if auth["token"] else {}
            http = await stack.enter_async_context(SseClient(base_url(args.http), headers=headers))
            try:
                reply = await http.get("/health", timeout=args.connect_timeout)
            except (OSError, asyncio.TimeoutError, HttpClientError) as exc:
                raise ValueError(f"cannot reach the HTTP API at {args.http}: {exc}") from None
            if reply.status != 200:
                raise ValueError(f"{args.http}/health answered {reply.status}: the HTTP API is not serving")
            send = http_sender(http, status.model.name)
        plan, clamped = build_plan(args, status.model.max_context_tokens, rows)
        progress = None if args.no_progress else ProgressBar(len(plan), label="bench")
        report = await run_bench(
            client,
            plan,
            seed=args.seed,
            request_timeout_s=args.request_timeout,
            allow_aliases=args.aliases,
            use_base=args.base_model,
            progress=progress,
            send=send,
        )
        if progress is not None:
            progress.close()
    report.clamped = clamped
    print(report.to_json() if args.json else format_bench(report), file=out)
    return report


def run_cli(args: argparse.Namespace) -> int:
    # Failed requests are results (overload shows up as RESOURCE_EXHAUSTED): the report counts them.
    asyncio.run(_bench_main(args, sys.stdout))
    return 0
