"""Memory probe of the serving processes, for soak runs: where does their memory go over time?

Off unless `LORAFLEET_MEMORY_PROBE=DIR` is set for `lorafleet serve` (the head writes to DIR; each
worker actor that inherits the variable, as a local Ray's workers do, to `DIR/worker-<pid>`). Every
`LORAFLEET_MEMORY_PROBE_INTERVAL_S` seconds (default 30) a process appends one JSON line to its
`probe.jsonl`: its RSS, the garbage collector's counts, the live objects by type (the 20 most
numerous), the number of asyncio tasks, and the sizes of its bookkeeping (the head: the fleet's and
the metrics'; a worker: its engine's and adapter cache's). With `LORAFLEET_MEMORY_PROBE_FRAMES=N` (N > 0)
it also traces allocations (tracemalloc, N frames) and dumps a snapshot per record
(`DIR/snapshot-<seq>.tracemalloc`), so two moments of a run can be compared afterwards with
`tracemalloc.Snapshot.load(...).compare_to(...)` (`benchmarks/soak.py` does).

A probe costs time (walking every object; tracing slows every allocation), so it is for diagnosis,
never for production.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV_DIR = "LORAFLEET_MEMORY_PROBE"
ENV_INTERVAL = "LORAFLEET_MEMORY_PROBE_INTERVAL_S"
ENV_FRAMES = "LORAFLEET_MEMORY_PROBE_FRAMES"
TOP_TYPES = 20


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process in MB (Linux /proc); 0.0 when it cannot be read."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settings_from_env(env: dict[str, str] | os._Environ[str] = os.environ) -> tuple[Path, float, int] | None:
    """(directory, interval_s, frames) when the probe is switched on; ValueError names a bad variable."""
    folder = env.get(ENV_DIR)
    if not folder:
        return None
    try:
        interval = float(env.get(ENV_INTERVAL, "30"))
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL} must be a number of seconds, got {env[ENV_INTERVAL]!r}") from None
    if not interval > 0:
        raise ValueError(f"{ENV_INTERVAL} must be > 0, got {interval:g}")
    raw_frames = env.get(ENV_FRAMES, "0")
    if not raw_frames.isdigit():
        raise ValueError(f"{ENV_FRAMES} must be a whole number of frames (0 = off), got {raw_frames!r}")
    return Path(folder), interval, int(raw_frames)


class MemoryProbe:
    def __init__(self, folder: Path, frames: int, sizes: Callable[[], dict[str, int]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.frames = frames
        self.sizes = sizes
        self.seq = 0
        self.t0 = time.monotonic()
        if frames and not tracemalloc.is_tracing():
            tracemalloc.start(frames)

    def record(self) -> dict:
        types = Counter(type(o).__name__ for o in gc.get_objects())
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # no running loop (tests call record() directly)
            tasks = 0
        entry = {
            "seq": self.seq,
            "t_s": round(time.monotonic() - self.t0, 1),
            "rss_mb": round(rss_mb(), 2),
            "gc_counts": list(gc.get_count()),
            "gc_collections": [s["collections"] for s in gc.get_stats()],
            "objects": sum(types.values()),
            "top_types": dict(types.most_common(TOP_TYPES)),
            "asyncio_tasks": tasks,
            "sizes": self.sizes(),
        }
        if self.frames:
            traced, peak = tracemalloc.get_traced_memory()
            entry["traced_mb"] = round(traced / 2**20, 2)
            entry["traced_peak_mb"] = round(peak / 2**20, 2)
            tracemalloc.take_snapshot().dump(str(self.folder / f"snapshot-{self.seq:04d}.tracemalloc"))
        with (self.folder / "probe.jsonl").open("a") as out:
            out.write(json.dumps(entry) + "\n")
        self.seq += 1
        return entry

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                # Off the loop thread would race the loop's own mutations of the dicts it sizes.
                self.record()
            except Exception:  # a probe must never take the server down
                log.warning("memory probe record failed", exc_info=True)
            await asyncio.sleep(interval_s)


def start(settings: tuple[Path, float, int], sizes: Callable[[], dict[str, int]]) -> asyncio.Task[None]:
    """Start the probe task on the running loop (`settings` from `settings_from_env`)."""
    folder, interval, frames = settings
    probe = MemoryProbe(folder, frames, sizes)
    log.warning("memory probe on: %s every %g s (tracemalloc frames: %d)", folder, interval, frames)
    return asyncio.get_running_loop().create_task(probe.run(interval), name="lorafleet-memory-probe")
