"""Starting and killing one worker's Ray actor, and the backoff between failed starts.

The runtime decides when a worker starts or stops and keeps the fleet's records (`runtime.py`);
these are the Ray calls it makes for one worker, and the arithmetic of retrying failed starts.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.scheduler.worker_actor import WorkerActor, WorkerInfo
from lorafleet.scheduler.worker_record import WorkerRecord
from lorafleet.worker.types import EngineStats

log = logging.getLogger("lorafleet.scheduler")

MAX_BACKOFF_S = 60.0


async def launch_actor(rec: WorkerRecord, cfg: FleetConfig) -> tuple[WorkerInfo, EngineStats]:
    """Create `rec`'s actor (`rec.handle`, set before waiting so a cancelled start can kill it)
    and wait for its engine to be ready. Raises whatever failed: model missing, out of memory,
    no resources, or the `worker_start_timeout_s` timeout."""
    # No task events: the GCS keeps them for every call (3.3 MB per 1,000 here, up to 100,000
    # tasks; benchmarks/leak_checks.py), and every request makes calls (soak, issue 13).
    actor = ray.remote(WorkerActor).options(
        num_cpus=cfg.worker_num_cpus,
        num_gpus=cfg.worker_num_gpus,
        max_restarts=0,
        enable_task_events=False,
    )
    rec.handle = actor.remote(rec.worker_id, cfg.model_dir, cfg.device, cfg.dtype, dict(cfg.engine))
    return await asyncio.wait_for(rec.handle.ready.remote(), cfg.worker_start_timeout_s)


def kill_actor(rec: WorkerRecord) -> None:
    """Kill `rec`'s actor if it has one; one already gone is fine. Needs the GCS: the runtime
    skips this once the cluster is lost."""
    if rec.handle is not None:
        try:
            ray.kill(rec.handle, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("kill %s: %s", rec.worker_id, exc)


class StartBackoff:
    """Consecutive failed worker starts: exponential backoff (`start_backoff_s` doubled per
    failure, at most `MAX_BACKOFF_S`) until a start succeeds, given up after `max_start_attempts`."""

    def __init__(self) -> None:
        self.failures = 0  # consecutive
        self.not_before = 0.0  # on the runtime's clock

    def waiting(self, now: float) -> bool:
        return now < self.not_before

    def succeeded(self) -> None:
        self.failures = 0

    def failed(self, cfg: FleetConfig, now: float) -> float | None:
        """Count a failure: the seconds to wait before the next start, or None to give up."""
        self.failures += 1
        if self.failures >= cfg.max_start_attempts:
            return None
        delay = min(MAX_BACKOFF_S, cfg.start_backoff_s * 2 ** (self.failures - 1))
        self.not_before = now + delay
        return delay
