"""The cost of one migration between two workers, measured through the runtime.

An in-process `Fleet` with two workers (one GPU each on CUDA) runs one greedy request at a time
with a prompt of `context - PRE` tokens. Once PRE tokens have arrived, the runtime's own migration
step (`FleetRuntime._move`, what a consolidation pass runs for each source and target) moves it to
the other worker: export on the source (its `SequenceState`), hand-over on the head, `add` on the
target, which recomputes the KV of prompt + generated tokens and continues. Timed from just before
the export call:
- export: until `_move` returns (the export's round trip plus the head's bookkeeping; the add is
  submitted, not awaited);
- first token on the target: when the target's step that produced the next token returned
  (the worker's own `time.time()`, same host);
- at the head: when that token reached this caller's stream.
The consolidation loop is slowed to once an hour so that it moves nothing by itself; `_move` is
private, and called here because no public call migrates one chosen request.
Warm-up migrations come first, so that the target has compiled the shapes and holds the adapter (the
placement picks between the two idle workers the same way each time, so warm-up and timed runs go
the same direction; each run records its source and target).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

from lorafleet.scheduler.fleet import Fleet
from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.types import Request, SamplingParams

PRE = 4  # tokens generated on the source before the move
# Room for more tokens after the move (the request is aborted once the target's first one arrives),
# so that a busy source cannot finish the sequence before the export reaches it.
POST = 64
ADAPTER = "migrated"
HEADROOM = 8  # context tokens left free at the move, so the target has a token to make
ATTEMPTS = 3  # a sequence that still finished on the source is tried again with a new request


class FinishedOnSource(RuntimeError):
    pass


async def _one(fleet: Fleet, rid: str, prompt: list[int], timeout_s: float) -> dict[str, Any]:
    rt = fleet._runtime  # the migration step itself; see the module doc
    sampling = SamplingParams(max_new_tokens=PRE + POST, temperature=0.0, ignore_eos=True)
    events: list[tuple[float, int, float]] = []  # (at head, tokens so far, produced on its worker)
    enough = asyncio.Event()

    async def consume() -> None:
        n = 0
        async for delta in fleet.generate(Request(rid, tuple(prompt), ADAPTER, sampling)):
            now = time.time()
            n += len(delta.new_token_ids)
            # Fleet.generate records (now - produced_at) for the delta it just yielded.
            events.append((now, n, now - fleet.delivery_latencies.latest()))
            if n >= PRE:
                enough.set()

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(enough.wait(), timeout_s)
        tr = rt.requests[rid]
        src = rt.workers[tr.owner]
        targets = [w for w in rt.live_workers() if w is not src and w.state.value == "active"]
        if not targets:
            raise RuntimeError("no second active worker to migrate to")
        t0 = time.time()
        await rt._move(src, targets[0], [rid])
        t1 = time.time()
        moved = len(tr.tokens)  # delivered so far, including what the export held beyond the stream
        if tr.owner != targets[0].worker_id:
            raise FinishedOnSource(f"request {rid} finished on {src.worker_id} before the export")
        deadline = time.monotonic() + timeout_s
        # The consumer stamps each delta as it arrives; this loop only waits for the target's first.
        while not any(e[1] > moved for e in events):
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"request {rid}: no token from the target {targets[0].worker_id}")
            await asyncio.sleep(0.001)
        await fleet.abort(rid)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    first = next(e for e in events if e[1] > moved)
    return {
        "source": src.worker_id,
        "target": targets[0].worker_id,
        "context_tokens": len(prompt) + moved,
        "export_ms": (t1 - t0) * 1000,
        "first_token_ms": (first[2] - t0) * 1000,
        "at_head_ms": (first[0] - t0) * 1000,
    }


async def start_pair(
    *, model_dir: str, device: str, dtype: str, engine: dict[str, Any], timeout_s: float = 120.0
) -> tuple[Fleet, float]:
    """An in-process fleet of exactly two active workers (the consolidation loop and the release of
    idle workers slowed to once an hour, so nothing moves by itself), and its start time."""
    config = FleetConfig(
        model_dir=model_dir,
        device=device,
        dtype=dtype,
        min_workers=2,
        max_workers=2,
        policy="least_loaded",
        engine=engine,
        consolidation_interval_s=3600.0,
        idle_release_s=3600.0,
    )
    begin = time.monotonic()
    fleet = await Fleet.start(config)
    try:
        while sum(w.state == "active" for w in fleet.status().workers) < 2:
            if time.monotonic() - begin > timeout_s * 5:
                raise TimeoutError("the two workers of the migration fleet did not start")
            await asyncio.sleep(0.1)
    except BaseException:
        await fleet.shutdown(drain=False)
        raise
    return fleet, time.monotonic() - begin


async def measure_migrations(
    fleet: Fleet,
    *,
    adapter_dir: str,
    contexts: list[int],
    warmups: int,
    repeats: int,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """One migration at a time on `start_pair`'s fleet, `warmups` + `repeats` per context length."""
    model = ModelConfig.from_dir(fleet.config.model_dir)
    limit = min(model.max_position_embeddings, int(fleet.config.engine.get("max_model_len") or 1 << 30))
    fleet.register_adapter(ADAPTER, adapter_dir, confined=False)
    rng = random.Random(seed)
    results = []
    for want in contexts:
        # The context at the move is prompt + PRE (+ what the source made meanwhile); a few more
        # tokens must still fit the model (the sequence stops at its context limit).
        context = min(want, limit - HEADROOM)
        runs = []
        for k in range(warmups + repeats):
            for attempt in range(ATTEMPTS):
                prompt = [rng.randrange(3, model.vocab_size) for _ in range(context - PRE)]
                try:
                    run = await _one(fleet, f"mig-{want}-{k}-{attempt}", prompt, timeout_s)
                    break
                except FinishedOnSource:
                    if attempt == ATTEMPTS - 1:
                        raise
            run["warmup"] = k < warmups
            runs.append(run)
        timed = [r for r in runs if not r["warmup"]]
        results.append(
            {
                "context_tokens_asked": want,
                "context_tokens": statistics.median(r["context_tokens"] for r in timed),
                "export_ms_p50": statistics.median(r["export_ms"] for r in timed),
                "first_token_ms_p50": statistics.median(r["first_token_ms"] for r in timed),
                "at_head_ms_p50": statistics.median(r["at_head_ms"] for r in timed),
                "runs": runs,
            }
        )
    return {
        "path": "runtime: FleetRuntime._move between two WorkerActors of an in-process Fleet",
        "contexts": results,
    }
