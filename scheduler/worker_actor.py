"""WorkerActor: one Engine per Ray actor, stepping continuously and streaming one report per step.

The head consumes `stream()` as a Ray streaming generator: each item is a `StepReport` with every
token all sequences produced in a step plus a load snapshot, so the head gets one message per step,
never one call per token. Handing an item to Ray costs about half a millisecond, so the engine loop
does not wait for it: it runs as its own task and queues its reports, and the stream sends what is
queued, merging several steps into one message when it falls behind.

Commands (add, abort, export, adapters) are ordinary actor calls executed between steps: an asyncio
lock serializes them with the step, which runs in a dedicated thread so the actor's event loop stays
free to receive commands and send reports while the model computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lorafleet.worker import fault_points, memory_probe
from lorafleet.worker.types import EngineStats, SequenceState, TokenDelta


@dataclass(frozen=True)
class WorkerInfo:
    """Fixed facts about a started worker (the head validates requests against them)."""

    worker_id: str
    pid: int
    max_batch_size: int
    block_size: int
    total_kv_blocks: int
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class StepReport:
    """The deltas of one or more consecutive steps, in order, and the load after the last one."""

    worker_id: str
    seq_no: int
    deltas: tuple[TokenDelta, ...]
    produced_at: tuple[float, ...]  # per delta: time.time() when its step returned
    stats: EngineStats


@dataclass(frozen=True)
class WorkItem:
    """A sequence to run here: a new request (no outputs yet) or a resumed one."""

    state: SequenceState
    adapter_path: str | None  # where to load its adapter from if this worker lacks it


@dataclass(frozen=True)
class AddResult:
    request_id: str
    error: str | None = None
    kind: str | None = None  # "invalid" | "unknown_adapter" | "error"


class WorkerActor:
    """Created through `ray.remote(WorkerActor).options(...)` by the head; usable in-process in tests."""

    def __init__(
        self,
        worker_id: str,
        model_dir: str,
        device: str,
        dtype: str,
        engine_kwargs: dict[str, Any],
        engine_factory: Callable[[], Any] | None = None,
    ) -> None:
        # Loading happens here so a worker that cannot load its model fails its creation and the
        # head sees the cause on its first call.
        if engine_factory is not None:
            self._engine = engine_factory()
        else:
            from lorafleet.worker.engine import Engine

            self._engine = Engine.from_pretrained(model_dir, device=device, dtype=dtype, **engine_kwargs)
        self._worker_id = worker_id
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{worker_id}")
        self._live: set[str] = set()  # requests in the engine (finished ones leave on their final delta)
        self._adapters: dict[str, str] = dict(self._engine.list_adapters())
        self._seq_no = 0
        self._reports: asyncio.Queue = asyncio.Queue()  # (deltas, produced_at, stats) | Exception | None
        self._loop_task: asyncio.Task | None = None
        self._probe: asyncio.Task | None = None  # memory probe (soak diagnostics), when asked for

    async def ready(self) -> tuple[WorkerInfo, EngineStats]:
        stats = self._engine.stats()
        info = WorkerInfo(
            worker_id=self._worker_id,
            pid=os.getpid(),
            max_batch_size=stats.max_batch_size,
            block_size=stats.block_size,
            total_kv_blocks=stats.num_total_kv_blocks,
            max_model_len=int(self._engine.max_model_len),
            vocab_size=int(self._engine.model_config.vocab_size),
        )
        return info, stats

    async def add(self, items: list[WorkItem]) -> list[AddResult]:
        """Queue new or resumed sequences; per-item errors are returned, not raised."""
        results = []
        async with self._lock:
            if any(item.state.output_token_ids for item in items):
                await fault_points.apause("resume")  # tests only: kill a migration's target here
            for item in items:
                results.append(self._add_one(item))
        self._wake.set()
        return results

    def _add_one(self, item: WorkItem) -> AddResult:
        request = item.state.request
        rid = request.request_id
        try:
            if request.adapter is not None and item.adapter_path is not None:
                self._ensure_adapter(request.adapter, item.adapter_path)
            if item.state.output_token_ids:
                self._engine.import_([item.state])
            else:
                self._engine.add_request(request)
        except KeyError as e:
            return AddResult(rid, str(e.args[0]) if e.args else str(e), "unknown_adapter")
        except ValueError as e:
            return AddResult(rid, str(e), "invalid")
        except Exception as e:  # the engine's own failure: report it with the request, never drop it
            return AddResult(rid, f"{type(e).__name__}: {e}", "error")
        self._live.add(rid)
        return AddResult(rid)

    def _ensure_adapter(self, name: str, path: str) -> None:
        if self._adapters.get(name) == path:
            return
        if name in self._adapters:
            self._engine.remove_adapter(name)  # re-pointed fleet-wide; raises if still in use here
            del self._adapters[name]
        self._engine.add_adapter(name, path)
        self._adapters[name] = path

    async def abort(self, request_ids: list[str]) -> list[TokenDelta]:
        async with self._lock:
            deltas = []
            for rid in request_ids:
                delta = self._engine.abort(rid)
                self._live.discard(rid)
                if delta is not None:
                    deltas.append(delta)
        self._wake.set()
        return deltas

    async def export(self, request_ids: list[str]) -> list[SequenceState]:
        """Remove and return the still-unfinished ones of `request_ids` (finished ones are skipped:
        their final delta is already in the stream)."""
        async with self._lock:
            # dict.fromkeys: the engine refuses a repeated id rather than lose the sequence.
            ids = list(dict.fromkeys(r for r in request_ids if r in self._live))
            if ids:
                await fault_points.apause("export")  # tests only: kill a migration's source here
            states = self._engine.export(ids) if ids else []
            self._live.difference_update(ids)
        self._wake.set()
        return states

    async def _engine_loop(self) -> None:
        """Step while there is work; queue a report per step, and one after each idle wake-up."""
        loop = asyncio.get_running_loop()
        try:
            while True:  # until the head kills the actor
                if not self._engine.has_unfinished():
                    if self._engine.has_idle_work() and not self._wake.is_set():
                        # Nothing to step: capture one graph left for idle moments. A request that
                        # arrives meanwhile waits for this one capture at most (add takes the lock).
                        async with self._lock:
                            if not self._engine.has_unfinished():
                                await loop.run_in_executor(self._pool, self._engine.run_idle_work)
                        continue
                    await self._wake.wait()
                self._wake.clear()
                async with self._lock:
                    deltas: list[TokenDelta] = []
                    if self._engine.has_unfinished():
                        deltas = await loop.run_in_executor(self._pool, self._engine.step)
                    produced_at = time.time()
                    for d in deltas:
                        if d.finish_reason is not None:
                            self._live.discard(d.request_id)
                    stats = self._engine.stats()
                self._reports.put_nowait((tuple(deltas), produced_at, stats))
        except Exception as exc:  # the engine broke: end the stream with the cause
            self._reports.put_nowait(exc)
        finally:
            self._reports.put_nowait(None)
            self._pool.shutdown(wait=False)

    def _start_memory_probe(self) -> None:
        # Soak diagnostics: on when the head's LORAFLEET_MEMORY_PROBE reached this process (a local
        # Ray's workers inherit the head's environment); one folder per worker process.
        settings = memory_probe.settings_from_env()
        if settings is None:
            return
        folder, interval_s, frames = settings
        self._probe = memory_probe.start(
            (folder / f"worker-{os.getpid()}", interval_s, frames), self._bookkeeping_sizes
        )

    def _bookkeeping_sizes(self) -> dict[str, int]:
        return {
            "live": len(self._live),
            "adapter_paths": len(self._adapters),
            "reports_queued": self._reports.qsize(),
            **self._engine.bookkeeping_sizes(),
        }

    async def stream(self) -> AsyncIterator[StepReport]:
        """The report stream (consume once, as a Ray streaming generator)."""
        if self._loop_task is not None:
            raise RuntimeError(f"worker {self._worker_id} is already streaming")
        self._loop_task = asyncio.get_running_loop().create_task(self._engine_loop())
        self._start_memory_probe()
        while True:
            items = [await self._reports.get()]
            while not self._reports.empty():
                items.append(self._reports.get_nowait())
            steps = [i for i in items if isinstance(i, tuple)]
            if steps:
                self._seq_no += 1
                stats = steps[-1][2]
                if len(steps) > 1:  # each snapshot carries only the load times since the previous one
                    loads = tuple(x for _, _, st in steps for x in st.adapter_load_seconds)
                    stats = dataclasses.replace(stats, adapter_load_seconds=loads)
                yield StepReport(
                    self._worker_id,
                    self._seq_no,
                    tuple(d for deltas, _, _ in steps for d in deltas),
                    tuple(t for deltas, t, _ in steps for _ in deltas),
                    stats,
                )
            for item in items:
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    return
