"""Fleet: the asyncio facade over the Ray runtime; the gRPC layer calls only these methods.

Lives in the `lorafleet serve` process. It validates requests at the door (so bad input is an
error before anything is queued), hands admitted ones to the `FleetRuntime` scheduler running on
the same event loop, and turns each request's stream into an async iterator of `TokenDelta`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import ray

from lorafleet.scheduler.adapter_registry import AdapterRegistry
from lorafleet.scheduler.errors import (
    AdapterInUseError,
    ClusterLostError,
    FleetError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
    UnknownAdapterError,
)
from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.scheduler.latency_ring import LatencyRing
from lorafleet.scheduler.policy_types import blocks_for
from lorafleet.scheduler.ray_connect import connect_ray
from lorafleet.scheduler.ray_watchdog import RayWatchdog, gcs_probe
from lorafleet.scheduler.runtime import FleetRuntime
from lorafleet.scheduler.status import ClusterStatus, FleetCounters, WorkerStatus
from lorafleet.scheduler.tracked_request import Failure, TrackedRequest
from lorafleet.worker.engine_config import EngineConfig
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.types import Request, TokenDelta

log = logging.getLogger("lorafleet.scheduler")
WATCHDOG_INTERVAL_S = 1.0  # how often the GCS is probed (at most; a third of ray_lost_timeout_s if less)


class Fleet:
    def __init__(
        self, config: FleetConfig, runtime: FleetRuntime, registry: AdapterRegistry, owns_ray: bool
    ) -> None:
        self.config = config
        self._runtime = runtime
        self._registry = registry
        self._owns_ray = owns_ray
        self._closed = False  # no new requests
        self._stopped = False  # workers stopped, Ray released
        self._aborts: set[asyncio.Task] = set()
        # Seconds from a token leaving its worker's step to its hand-over to the caller (recent ones).
        self.delivery_latencies = LatencyRing(100_000)
        self.lost_reason: str | None = None  # set once the Ray cluster counts as lost
        self._lost = asyncio.Event()
        self._watchdog: asyncio.Task | None = None

    @classmethod
    async def start(cls, config: FleetConfig) -> Fleet:
        """Start (or join) Ray and `config.min_workers` workers; returns once at least one is ready.

        Raises ValueError for a bad engine config, RayConnectError (a FleetError) when Ray cannot be
        started or joined within `ray_connect_timeout_s`, and FleetError if no worker could start.
        """
        engine_config = EngineConfig.from_dict(dict(config.engine))
        try:
            model_config = ModelConfig.from_dir(config.model_dir)
        except Exception as exc:
            if config.ray_address is None:
                raise ValueError(f"cannot read the model at {config.model_dir}: {exc}") from exc
            log.warning("model not readable on the head (%s); adapters get a shallow check only", exc)
            model_config = None
        owns_ray = await connect_ray(config.ray_address, config.ray_connect_timeout_s)
        registry = AdapterRegistry(engine_config, model_config, config.adapter_roots)
        runtime = FleetRuntime(config, registry.get)
        fleet = cls(config, runtime, registry, owns_ray)
        try:
            await runtime.start()
        except BaseException:
            await fleet.shutdown(drain=False)
            raise
        if runtime.info is None:
            await fleet.shutdown(drain=False)
            raise FleetError(f"no worker could start: {runtime.start_gave_up or runtime.last_start_error}")
        fleet._watch_ray(ray.get_runtime_context().gcs_address)
        return fleet

    def _watch_ray(self, gcs_address: str) -> None:
        lost_after = self.config.ray_lost_timeout_s
        interval = min(WATCHDOG_INTERVAL_S, lost_after / 3)
        watchdog = RayWatchdog(
            gcs_probe(gcs_address, timeout_s=0.8 * interval),
            self._on_ray_lost,
            interval_s=interval,
            lost_after_s=lost_after,
        )
        self._watchdog = asyncio.get_running_loop().create_task(watchdog.run(), name="lorafleet-ray-watchdog")

    def _on_ray_lost(self, reason: str) -> None:
        self.lost_reason = f"lost the Ray cluster: {reason}"
        log.error("%s; failing every admitted request (UNAVAILABLE)", self.lost_reason)
        self._runtime.cluster_lost(self.lost_reason)
        self._lost.set()

    async def wait_lost(self) -> str:
        """Return (the reason) once the fleet has lost its Ray cluster; it cannot serve again."""
        await self._lost.wait()
        assert self.lost_reason is not None
        return self.lost_reason

    # ------------------------------------------------------------ requests

    async def generate(self, request: Request) -> AsyncIterator[TokenDelta]:
        """Stream the request's deltas; the last one has finish_reason set.

        Raises (on the first iteration): UnknownAdapterError, InvalidRequestError, QueueFullError,
        ShuttingDownError; later RequestFailedError if it cannot complete. Leaving the iteration
        early (client cancelled) aborts the request and frees its blocks.
        """
        try:
            tr = self._admit(request)
        except FleetError:
            self._runtime.counters["requests_rejected"] += 1
            raise
        done = False
        try:
            while True:
                item = await tr.stream.get()
                if isinstance(item, Failure):
                    done = True
                    raise self._error(tr.request_id, item)
                delta, produced_at = item
                self.delivery_latencies.append(time.time() - produced_at)
                done = delta.finish_reason is not None
                yield delta
                if done:
                    return
        finally:
            if not done:
                task = asyncio.get_running_loop().create_task(self._runtime.abort(tr.request_id))
                self._aborts.add(task)
                task.add_done_callback(self._aborts.discard)

    def _admit(self, request: Request) -> TrackedRequest:
        rt = self._runtime
        if self.lost_reason is not None:
            raise ClusterLostError(self.lost_reason)
        if self._closed or rt.closing:
            raise ShuttingDownError("the fleet is shutting down")
        if not isinstance(request, Request):
            raise InvalidRequestError(f"expected a Request, got {type(request).__name__}")
        rid = request.request_id
        if rid in rt.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in flight")
        if request.adapter is not None and request.adapter not in self._registry:
            raise UnknownAdapterError(f"unknown adapter {request.adapter!r}")
        info = rt.info
        if info is not None:
            n = len(request.prompt_token_ids)
            if n >= info.max_model_len:
                raise InvalidRequestError(
                    f"request {rid}: the prompt has {n} tokens; the model's context is {info.max_model_len}"
                )
            for what, ids in (
                ("token id", request.prompt_token_ids),
                ("stop token id", request.sampling.stop_token_ids),
            ):
                bad = [t for t in ids if not 0 <= t < info.vocab_size]
                if bad:
                    raise InvalidRequestError(
                        f"request {rid}: {what} {bad[0]} outside the vocabulary [0, {info.vocab_size})"
                    )
            longest = min(n + request.sampling.max_new_tokens, info.max_model_len)
            if blocks_for(longest, info.block_size) > info.total_kv_blocks:
                raise InvalidRequestError(
                    f"request {rid}: up to {longest} tokens need more KV blocks than a worker holds "
                    f"({info.total_kv_blocks} of {info.block_size} tokens)"
                )
        if len(rt.queue) >= self.config.max_queue:
            rt.place()  # admissions of this burst may not have been placed yet: the queue may clear
        if len(rt.queue) >= self.config.max_queue:
            raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting)")
        tr = TrackedRequest(request)
        rt.admit(tr)
        return tr

    @staticmethod
    def _error(request_id: str, failure: Failure) -> FleetError:
        if failure.kind == "invalid":
            return InvalidRequestError(failure.reason)
        if failure.kind == "unknown_adapter":
            return UnknownAdapterError(failure.reason)
        if failure.kind == "unavailable":
            return ClusterLostError(failure.reason)
        return RequestFailedError(request_id, failure.reason)

    async def abort(self, request_id: str) -> None:
        """Cancel a queued or running request; its stream ends with finish_reason ABORT."""
        await self._runtime.abort(request_id)

    # ------------------------------------------------------------ adapters

    def register_adapter(self, name: str, path: str, *, confined: bool = True) -> None:
        """Register (or re-point) an adapter fleet-wide; ValueError if the directory is not a valid
        PEFT adapter for this model and these workers, AdapterInUseError when re-pointing a name
        that unfinished requests use (register the new version under a new name instead).

        ``confined`` (API callers): the path must lie inside `FleetConfig.adapter_roots`; the
        operator's own start-up adapters pass False.
        """
        if confined:
            self._registry.confine(path)
        resolved = self._registry.check(name, path)
        current = self._registry.get(name)
        if current is not None and current != resolved:
            users = sum(
                1 for tr in self._runtime.requests.values() if not tr.finished and tr.request.adapter == name
            )
            if users:
                raise AdapterInUseError(
                    f"adapter {name!r} is in use by {users} unfinished request(s) and cannot point to "
                    "another directory until they finish; register the new version under a new name"
                )
        self._registry.add(name, resolved)

    def unregister_adapter(self, name: str) -> None:
        """UnknownAdapterError (a KeyError) if not registered; running sequences still finish."""
        self._registry.unregister(name)

    def list_adapters(self) -> dict[str, str]:
        return self._registry.as_dict()

    def set_worker_bounds(self, min_workers: int | None = None, max_workers: int | None = None) -> None:
        """Change the fleet's size limits while it runs (ValueError if invalid). Growing `min_workers`
        starts workers now; lowering it lets idle workers be released by the consolidation pass;
        lowering `max_workers` stops no running worker, it only bounds future starts."""
        new = dataclasses.replace(
            self.config,
            min_workers=self.config.min_workers if min_workers is None else min_workers,
            max_workers=self.config.max_workers if max_workers is None else max_workers,
        )
        self.config = new
        self._runtime.set_worker_bounds(new.min_workers, new.max_workers)

    # ------------------------------------------------------------ status and shutdown

    def bookkeeping_sizes(self) -> dict[str, int]:
        """Entries in the fleet's per-request structures (see `FleetRuntime.bookkeeping_sizes`)."""
        return {
            **self._runtime.bookkeeping_sizes(),
            "pending_aborts": len(self._aborts),
            "delivery_latencies": len(self.delivery_latencies),
            "adapters_registered": len(self._registry.as_dict()),
        }

    def status(self) -> ClusterStatus:
        rt = self._runtime
        workers = []
        for w in rt.live_workers():
            info, stats = w.info, w.stats
            workers.append(
                WorkerStatus(
                    worker_id=w.worker_id,
                    state=w.state.value,
                    num_running=len(w.assigned),
                    max_batch_size=info.max_batch_size if info else 0,
                    free_kv_blocks=stats.num_free_kv_blocks if stats else 0,
                    total_kv_blocks=info.total_kv_blocks if info else 0,
                    resident_adapters=tuple(stats.resident_adapters) if stats else (),
                    last_error=w.last_error,
                    pid=info.pid if info else 0,
                )
            )
        c = rt.counters
        totals = rt.engine_totals()
        counters = FleetCounters(
            **{
                k: int(c[k])
                for k in FleetCounters.__dataclass_fields__
                if k in c and k != "adapter_load_seconds_sum"
            },
            preemptions=totals.get("num_preemptions", 0),
            adapter_loads=totals.get("num_adapter_loads", 0),
            adapter_cache_hits=totals.get("adapter_cache_hits", 0),
            adapter_cache_misses=totals.get("adapter_cache_misses", 0),
            adapter_load_seconds_sum=float(c["adapter_load_seconds_sum"]),
        )
        return ClusterStatus(
            tuple(workers),
            len(rt.queue),
            counters,
            tuple(rt.recent_load_seconds),
            rt.start_gave_up or rt.last_start_error,
        )

    async def shutdown(self, drain: bool = True) -> None:
        """drain=True: refuse new requests, finish admitted ones, then stop the workers.
        drain=False: abort everything (streams end with finish_reason ABORT) and stop now.

        A drain may be cancelled (e.g. after a timeout) and followed by shutdown(drain=False)."""
        self._closed = True
        if self._stopped:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._runtime.shutdown(drain)
        if self._stopped:
            return
        self._stopped = True
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        if self._owns_ray:
            ray.shutdown()
