"""What `Fleet.status()` returns: plain dataclasses the API and metrics layers read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    state: str  # "starting" | "active" | "draining" | "stopped"
    num_running: int
    max_batch_size: int
    free_kv_blocks: int
    total_kv_blocks: int
    resident_adapters: tuple[str, ...]
    last_error: str | None = None  # why its last start attempt failed, if it did
    pid: int = 0  # its process id on its node (0 until started); e.g. to find it to kill in a test


@dataclass(frozen=True)
class FleetCounters:
    """Monotonic totals since the fleet started (adapter/preemption totals include dead workers)."""

    requests_admitted: int = 0
    requests_completed: int = 0  # finished with STOP or LENGTH
    requests_aborted: int = 0
    requests_failed: int = 0
    requests_rejected: int = 0  # refused at admission (unknown adapter, invalid, queue full, closing)
    tokens_generated: int = 0
    migrations: int = 0
    evictions: int = 0  # KV-pressure evictions by the consolidation pass
    resumed_after_fault: int = 0
    preemptions: int = 0  # engine-internal preemptions, summed over workers
    worker_starts: int = 0
    worker_start_failures: int = 0
    worker_deaths: int = 0
    workers_released: int = 0
    adapter_loads: int = 0
    adapter_cache_hits: int = 0
    adapter_cache_misses: int = 0
    adapter_load_seconds_sum: float = 0.0
    adapter_load_count: int = 0


@dataclass(frozen=True)
class ClusterStatus:
    workers: tuple[WorkerStatus, ...]
    queue_len: int
    counters: FleetCounters
    # The most recent adapter load times (seconds), newest last, at most 1,024; each reading also
    # counts once in counters.adapter_load_seconds_sum/count, which are what a histogram should use.
    recent_adapter_load_seconds: tuple[float, ...] = ()
    # Why the last failed worker start failed (None if none has); set for good once the fleet has
    # given up starting workers after max_start_attempts consecutive failures.
    last_start_error: str | None = None

    @property
    def num_active_workers(self) -> int:
        return sum(1 for w in self.workers if w.state == "active")
