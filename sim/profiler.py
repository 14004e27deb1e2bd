"""`lorafleet profile`: measure a latency profile on a real `Engine` over a small grid.

Sweeps (each step timed alone with perf_counter around `Engine.step`, after warm-up steps):
- decode: b sequences of one adapter decoding, b over 1, 2, 4, ... up to the max batch;
- context: half the max batch decoding with longer and longer prompts (the per-context-token slope);
- prefill: one prompt of P tokens, the step that computes it (intercept = base(0), slope);
- adapters: a full batch over 1, 2, 4, ... distinct adapters (the per-adapter slope);
- adapter loads: first use of an adapter (disk read + upload) on the measured engine, and re-uploads
  from the host cache on a second engine with one GPU slot (so every switch reloads);
- the serving stack: requests through a real one-worker fleet (`start_serving` and a gRPC client),
  one at a time and a full batch at once; what their TPOT and TTFT exceed the engine model by
  becomes the per-step overhead (a fixed part and a part per sequence in the step) and the
  per-request one (Ray actor loop, head, gRPC); single requests after idle pauses of 0.03 to 1 s
  give how much later a worker that has slept answers (the wake-up table);
- worker start-up: a `WorkerActor` in a local Ray, created until `ready()` answers (as the runtime
  grows the fleet: on the CPU, the second and third beside a running first); with
  `--no-ray-start`, `Engine.from_pretrained` alone.
The four engine sweeps are measured in ROUNDS interleaved rounds (each visits every point for a share
of its repeats), so the machine's speed drifting during the run touches every point alike. The fit
(see `sim/profile.py`) is least squares per sweep, the adapter slope rescaled to the decode sweep's
speed (`sim/profile_fit.py`); the raw samples go into the file too, sweep by sweep.
Imports torch (through the engine): only the `profile` command loads this module.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafleet.sim.profile import EngineShape, LatencyProfile
from lorafleet.sim.profile_fit import adapter_slope, least_squares

# Idle pauses before single requests through the serving stack (the wake-up table's points).
WAKE_GAPS_S = (0.03, 0.1, 0.3, 1.0)
# The grid is measured in this many rounds, each visiting every point of every sweep for a share of
# its repeats: a drift of the machine's speed during the run then touches every point alike, where
# sweep after sweep it would sit in whichever points were timed while it lasted.
ROUNDS = 4

Sample = tuple[int, int, int, int, float]  # decode seqs, prefill tokens, total context, adapters, seconds


def _grid(top: int) -> list[int]:
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return [*out, top]


def _rounds(repeats: int) -> list[int]:
    """Timed steps per visit when a grid point's `repeats` are spread over up to ROUNDS visits."""
    rounds = max(1, min(ROUNDS, repeats))
    return [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]


class _Runner:
    def __init__(self, engine: Any, adapters: list[str], warmup: int, repeats: int) -> None:
        from lorafleet.worker.types import Request, SamplingParams

        self.engine = engine
        self.adapters = adapters
        self.warmup = warmup
        self.repeats = repeats
        self._request, self._sampling = Request, SamplingParams
        self._ids = 0

    def _add(self, prompt: int, max_new: int, adapter: str | None) -> str:
        self._ids += 1
        rid = f"profile-{self._ids}"
        tokens = tuple(3 + (i * 7 + self._ids) % 250 for i in range(prompt))
        sampling = self._sampling(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
        self.engine.add_request(self._request(rid, tokens, adapter, sampling))
        return rid

    def admit(self, adapter: str) -> tuple[float, ...]:
        """The load times of getting one request for ``adapter`` admitted (then aborted).

        Admission waits for the adapter's load (a loader thread reads it from disk), so step until
        the request runs rather than once.
        """
        rid = self._add(4, 1, adapter)
        deadline = time.monotonic() + 120.0
        # (Not stats(): it hands out, and so clears, the load times this returns.)
        while self.engine.has_unfinished() and all(
            s.request_id != rid for s in self.engine.scheduler.running
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"adapter {adapter!r} was not admitted within 120 s")
            self.engine.step()
        self.engine.abort(rid)
        return self.engine.adapters.take_load_seconds()

    def _clear(self, rids: list[str]) -> None:
        for rid in rids:
            self.engine.abort(rid)

    def decode(self, batch: int, prompt: int, adapters: int, repeats: int | None = None) -> list[Sample]:
        """Samples of decode steps with `batch` sequences over `adapters` distinct adapters."""
        steps = self.warmup + (self.repeats if repeats is None else repeats)
        names = [self.adapters[i % adapters] if self.adapters else None for i in range(batch)]
        rids = [self._add(prompt, steps + 2, names[i]) for i in range(batch)]
        sched = self.engine.scheduler
        while sched.waiting or any(
            s.num_uncomputed_tokens != 1 or not s.output_token_ids for s in sched.running
        ):
            self.engine.step()  # prefill (possibly chunked) until everyone decodes
        out: list[Sample] = []
        for i in range(steps):
            ctx = sum(s.num_computed_tokens + 1 for s in sched.running)
            t0 = time.perf_counter()
            self.engine.step()
            dt = time.perf_counter() - t0
            if i >= self.warmup:
                out.append((batch, 0, ctx, len({n for n in names if n is not None}), dt))
        self._clear(rids)
        return out

    def prefill(self, prompt: int, repeats: int | None = None) -> list[Sample]:
        out: list[Sample] = []
        for i in range(self.warmup + (self.repeats if repeats is None else repeats)):
            rid = self._add(prompt, 1, self.adapters[0] if self.adapters else None)
            t0 = time.perf_counter()
            self.engine.step()
            # With overlapped stepping (CUDA) the first call only queues the pass; the second
            # waits for its token. Step by step, the request is done and the second call is empty.
            self.engine.step()
            dt = time.perf_counter() - t0
            self._clear([rid])
            if i >= self.warmup:
                out.append((0, prompt, prompt, 1 if self.adapters else 0, dt))
        return out


def ray_worker_start_s(
    model_dir: str, device: str, dtype: str, engine_options: dict[str, Any], *, later: int = 2
) -> list[float]:
    """Seconds from creating a `WorkerActor` in a running local Ray to its `ready()` answering: what
    the runtime waits when it grows the fleet (process start, imports, model load). Every start timed.

    On the CPU, timed as the fleet grows: a first worker is up (as the fleet's first is, before it
    serves, while Ray still boots its pool of idle worker processes), then ``later`` more start one at
    a time (the profile keeps the median of those). On CUDA a second worker would need a second GPU:
    the first start only.
    """
    import ray

    from lorafleet.scheduler.worker_actor import WorkerActor

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    actors: list[Any] = []
    try:
        gpus = 1.0 if device == "cuda" else 0.0
        seconds: list[float] = []
        for i in range(1 if device == "cuda" else 1 + later):
            t0 = time.perf_counter()
            actor = (
                ray.remote(WorkerActor)
                .options(num_cpus=0, num_gpus=gpus, max_restarts=0)
                .remote(f"profile-start-{i}", model_dir, device, dtype, dict(engine_options))
            )
            actors.append(actor)
            ray.get(actor.ready.remote())
            seconds.append(time.perf_counter() - t0)
        for actor in actors:
            ray.kill(actor, no_restart=True)
    finally:
        ray.shutdown()
    return seconds


def serving_latency(
    model_dir: str,
    adapters_dir: str | None,
    device: str,
    dtype: str,
    engine_options: dict[str, Any],
    *,
    prompt: int,
    new_tokens: int,
    count: int,
    batches: tuple[int, ...] = (1,),
    gaps: tuple[float, ...] = (),
    gap_count: int = 8,
) -> tuple[dict[int, tuple[float, float]], dict[float, float], float]:
    """Requests through the real stack (`start_serving`: Ray worker, head, gRPC) as a client sees
    them, `count` rounds of b at once for each b in `batches` (1: one request at a time), then
    `gap_count` single requests each after an idle pause of g seconds for each g in `gaps`:
    ({b: (median TTFT, median TPOT)}, {g: median TTFT}, seconds until the fleet was ready)."""
    import asyncio

    from lorafleet.client.grpc_client import AsyncClient
    from lorafleet.config import ServeConfig
    from lorafleet.serving.serve import shutdown_serving, start_serving

    sampling = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}

    async def one(client: Any, ids: list[int], adapter: str | None) -> tuple[float, float] | None:
        sent = time.perf_counter()
        first = last = None
        tokens = 0
        async for chunk in client.stream(ids, adapter=adapter, sampling=sampling):
            if chunk.token_ids:
                last = time.perf_counter()
                first = first or last
                tokens += len(chunk.token_ids)
        if first is None or last is None or tokens < 2:
            return None
        return first - sent, (last - first) / (tokens - 1)

    async def run() -> tuple[dict[int, tuple[float, float]], dict[float, float], float]:
        config = ServeConfig(
            model=model_dir,
            adapters_dir=adapters_dir,
            device=device,
            dtype=dtype,
            port=0,
            metrics_port=None,
            http_port=None,  # gRPC only: no fixed port to collide with other servers
            engine=dict(engine_options),
        )
        t0 = time.perf_counter()
        api = await start_serving(config)
        ready_s = time.perf_counter() - t0
        out: dict[int, tuple[float, float]] = {}
        after_gap: dict[float, float] = {}
        try:
            async with AsyncClient(api.address) as client:
                await client.wait_ready(60.0)
                adapters = sorted(await client.list_adapters())
                adapter = adapters[0] if adapters else None
                for b in batches:
                    got = []
                    for i in range(count):
                        prompts = [[3 + (7 * j + i + k) % 250 for j in range(prompt)] for k in range(b)]
                        got += await asyncio.gather(*(one(client, ids, adapter) for ids in prompts))
                    done = [g for g in got if g is not None]
                    if not done:
                        raise RuntimeError(f"no request of batch {b} streamed two tokens through the stack")
                    out[b] = (statistics.median(g[0] for g in done), statistics.median(g[1] for g in done))
                for gap in gaps:
                    ttfts = []
                    for i in range(gap_count):
                        await asyncio.sleep(gap)
                        got1 = await one(client, [3 + (7 * j + i) % 250 for j in range(prompt)], adapter)
                        if got1 is not None:
                            ttfts.append(got1[0])
                    if not ttfts:
                        raise RuntimeError(f"no request after a {gap} s pause streamed two tokens")
                    after_gap[gap] = statistics.median(ttfts)
        finally:
            await shutdown_serving(api, drain_timeout_s=30.0)
        return out, after_gap, ready_s

    return asyncio.run(run())


def _median_by(samples: list[Sample], key: Callable[[Sample], Any]) -> dict[Any, list[Sample]]:
    groups: dict[Any, list[Sample]] = {}
    for s in samples:
        groups.setdefault(key(s), []).append(s)
    return groups


def measure_profile(
    model_dir: str,
    *,
    device: str,
    dtype: str,
    engine_options: dict[str, Any],
    adapters_dir: str | None,
    name: str,
    warmup: int = 3,
    repeats: int = 8,
    ray_start: bool = True,
    serving: bool = True,
    log: Callable[[str], None] = print,
) -> LatencyProfile:
    from lorafleet.worker import Engine

    adapter_dirs = (
        sorted(p for p in Path(adapters_dir).iterdir() if (p / "adapter_config.json").is_file())
        if adapters_dir
        else []
    )

    # Adapter re-uploads from the host cache: a one-slot engine where every switch reloads.
    host_loads: list[float] = []
    if len(adapter_dirs) >= 2:
        small = Engine.from_pretrained(
            model_dir, device=device, dtype=dtype, **{**engine_options, "max_loras": 1}
        )
        for d in adapter_dirs[:2]:
            small.add_adapter(d.name, d)
        run = _Runner(small, [d.name for d in adapter_dirs[:2]], 0, 1)
        for i in range(2 * (warmup + repeats)):
            loads = run.admit(adapter_dirs[i % 2].name)
            if i >= 2 + warmup:  # the first two are disk loads
                host_loads.extend(loads)
        del small, run
        # Its KV cache took most of the free memory: return it before the measured engine sizes its own.
        gc.collect()
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()
        if host_loads:
            log(f"host-cache reloads: median {statistics.median(host_loads) * 1e3:.2f} ms")
        else:  # e.g. both adapters name the same files, so the cache never reloaded one
            log("host-cache reloads: none measured; the profile uses the disk load time")

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model_dir, device=device, dtype=dtype, **engine_options)
    start_s = time.perf_counter() - t0
    log(f"engine start-up: {start_s:.2f} s")
    if ray_start:
        starts = ray_worker_start_s(model_dir, device, dtype, engine_options)
        start_s = statistics.median(starts[1:] or starts)
        log(f"Ray worker start-up: {start_s:.2f} s (each start: {', '.join(f'{x:.2f}' for x in starts)} s)")
    for d in adapter_dirs:
        engine.add_adapter(d.name, d)
    names = [d.name for d in adapter_dirs]
    cfg = engine.config
    max_len = engine.max_model_len
    runner = _Runner(engine, names, warmup, repeats)

    disk_loads: list[float] = []
    for n in names[: cfg.max_loras]:  # first use of each: read from disk and upload
        disk_loads.extend(runner.admit(n))

    room = max_len - (warmup + repeats + 4)
    short = min(16, room)
    one = 1 if names else 0
    half = max(1, cfg.max_batch_size // 2)
    lengths = sorted({min(room, n) for n in (16, 64, 128, 256, 512, 1024, 2048) if n <= room} or {room})
    top_prefill = min(cfg.max_num_batched_tokens, max_len - 2)
    prompts = sorted({p for p in (16, 64, 128, 256, 512, 1024, 2048, top_prefill) if p <= top_prefill})
    adapter_counts = _grid(min(len(names), cfg.max_batch_size, cfg.max_loras)) if names else []
    decode: list[Sample] = []
    context: list[Sample] = []
    prefill: list[Sample] = []
    adapter: list[Sample] = []
    for share in _rounds(repeats):  # every sweep's points in each round (see ROUNDS)
        decode += [s for b in _grid(cfg.max_batch_size) for s in runner.decode(b, short, one, share)]
        context += [s for n in lengths for s in runner.decode(half, n, one, share)]
        prefill += [s for p in prompts for s in runner.prefill(p, share)]
        adapter += [s for a in adapter_counts for s in runner.decode(cfg.max_batch_size, short, a, share)]
    log(
        f"sweeps in {len(_rounds(repeats))} rounds: decode {len(decode)}, context {len(context)}, "
        f"prefill {len(prefill)}, adapters {len(adapter)} steps"
    )
    # Kept sweep by sweep, in this order (profile_fit.adapter_sweep finds the last one by it).
    samples = decode + context + prefill + adapter

    _, per_ctx = least_squares([float(s[2]) for s in context], [s[4] for s in context])
    per_ctx = max(0.0, per_ctx)
    base0, prefill_slope = least_squares([float(s[1]) for s in prefill], [s[4] for s in prefill])
    per_prefill = max(0.0, prefill_slope - per_ctx)
    groups = _median_by(decode, lambda s: s[0])
    batches = sorted(groups)
    bases = [statistics.median(s[4] - per_ctx * s[2] for s in groups[b]) for b in batches]
    # The adapter slope at the decode sweep's speed (profile_fit explains why).
    per_adapter = adapter_slope(adapter, per_ctx, dict(zip(batches, bases)).get(cfg.max_batch_size))
    host_adapters = 0
    if names:  # how many adapters of this size the host cache's byte budget holds
        from lorafleet.worker.adapters import load_adapter

        nbytes = load_adapter(adapter_dirs[0], engine.model_config, name=names[0], dtype=engine.dtype).nbytes
        host_adapters = cfg.host_cache_bytes // nbytes if nbytes else 0
    shape = EngineShape(
        max_batch_size=cfg.max_batch_size,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        block_size=cfg.block_size,
        num_kv_blocks=engine.allocator.num_blocks,
        max_loras=cfg.max_loras,
        max_model_len=max_len,
        host_cache_adapters=int(host_adapters),
    )
    del engine, runner  # the serving measurement below starts its own worker
    step_overhead = per_seq = request_overhead = 0.0
    wake_up: tuple[tuple[float, float], ...] = ()
    if serving:
        prompt, new = min(16, max_len // 4), min(32, max_len // 4)
        top = cfg.max_batch_size
        stack, after_gap, _ = serving_latency(
            model_dir,
            adapters_dir,
            device,
            dtype,
            engine_options,
            prompt=prompt,
            new_tokens=new,
            count=warmup + repeats,
            batches=(1, top) if top > 1 else (1,),
            gaps=WAKE_GAPS_S,
            gap_count=max(3, (warmup + repeats) // 2),
        )
        # What a decode step of b sequences costs by the engine model, each at its mean context.
        base_at = dict(zip(batches, bases))

        def model_tpot(b: int) -> float:
            return base_at.get(b, 0.0) + per_ctx * b * (prompt + new // 2)

        ttft, tpot = stack[1]
        over_one = tpot - model_tpot(1)
        if top > 1:  # the overhead at a full batch against one sequence: its per-sequence part
            per_seq = max(0.0, (stack[top][1] - model_tpot(top) - over_one) / (top - 1))
            # One sequence's share cannot exceed the whole overhead at one sequence (the fixed part
            # is not negative): a noisy full-batch sample must not make one request's steps dearer.
            per_seq = min(per_seq, max(0.0, over_one))
        step_overhead = max(0.0, over_one - per_seq)
        model_ttft = step_overhead + max(0.0, base0) + (per_prefill + per_ctx) * prompt
        request_overhead = max(0.0, ttft - model_ttft)
        # Back to back the stack never sleeps; after a pause the first token comes later. A longer
        # sleep is not a shorter wake-up: the table is kept non-decreasing against sampling noise.
        extra, points = 0.0, [(0.0, 0.0)]
        for g, t in sorted(after_gap.items()):
            extra = max(extra, t - ttft)
            points.append((g, extra))
        wake_up = tuple(points)
        full = f", {top} at once TPOT {stack[top][1] * 1e3:.2f} ms" if top > 1 else ""
        log(
            f"serving stack, one request at a time: TTFT {ttft * 1e3:.2f} ms, TPOT {tpot * 1e3:.2f} ms"
            f"{full} -> "
            f"step overhead {step_overhead * 1e3:.2f} ms + {per_seq * 1e3:.3f} ms per sequence, "
            f"request overhead {request_overhead * 1e3:.2f} ms; after an idle pause of "
            + ", ".join(f"{g:g} s +{x * 1e3:.2f} ms" for g, x in wake_up[1:])
        )
    disk_s = statistics.median(disk_loads) if disk_loads else 0.0
    host_s = statistics.median(host_loads) if host_loads else disk_s
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return LatencyProfile(
        name=name,
        engine=shape,
        decode_batch=(0, *batches),
        decode_base_s=(max(0.0, base0), *(max(0.0, b) for b in bases)),
        per_prefill_token_s=per_prefill,
        per_context_token_s=per_ctx,
        per_adapter_s=per_adapter,
        adapter_disk_load_s=disk_s,
        adapter_host_load_s=host_s,
        worker_start_s=start_s,
        step_overhead_s=step_overhead,
        step_overhead_per_seq_s=per_seq,
        wake_up_s=wake_up,
        request_overhead_s=request_overhead,
        source=(
            f"lorafleet profile --model {model_dir} --device {device} --dtype {dtype}"
            + "".join(f" --engine {k}={v}" for k, v in engine_options.items())
            + f"; {when}; "
            f"{platform.node()} {cpu_name() if device == 'cpu' else _gpu_name()}"
        ),
        samples=tuple(samples),
    )


def cpu_name() -> str:
    """This machine's CPU model (what benchmark reports name the machine by)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
