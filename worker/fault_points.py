"""Fault points: test-only pauses at named places of a worker, so that a fault test can kill the
worker exactly there instead of hoping its kill lands at the right moment.

Off unless `LORAFLEET_FAULT_DELAYS` is set in the worker's environment (Ray's workers inherit the
environment of the process that started the local Ray): a comma-separated list of `POINT=SECONDS`.
The points:

- `adapter_load:NAME` — inside the disk load of adapter NAME (`adapter_cache._load_packed`);
- `export` — in `WorkerActor.export`, holding the actor's lock, before the engine exports;
- `resume` — in `WorkerActor.add`, holding the lock, before a batch with a resumed sequence (one
  that carries outputs: a migration target, or a resume after a fault) reaches the engine.

With `LORAFLEET_FAULT_MARK_DIR` set as well, each pause first creates `DIR/POINT.PID` (the point
without its `:NAME`), so the test knows the pause has begun and which process to kill.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path

ENV_DELAYS = "LORAFLEET_FAULT_DELAYS"
ENV_MARK_DIR = "LORAFLEET_FAULT_MARK_DIR"
POINTS = ("adapter_load", "export", "resume")


def parse_delays(text: str) -> dict[str, float]:
    """'export=2,adapter_load:slow=5' -> {'export': 2.0, 'adapter_load:slow': 5.0}; ValueError
    naming the variable and the bad entry otherwise."""
    delays: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        point, sep, seconds = entry.partition("=")
        kind, _, arg = point.partition(":")
        if not sep or kind not in POINTS or (kind == "adapter_load") != bool(arg):
            raise ValueError(
                f"{ENV_DELAYS}: bad entry {entry!r}; expected POINT=SECONDS with POINT one of "
                "adapter_load:NAME, export, resume"
            )
        try:
            value = float(seconds)
        except ValueError:
            raise ValueError(f"{ENV_DELAYS}: {point} needs a number of seconds, got {seconds!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{ENV_DELAYS}: {point} needs a finite number of seconds >= 0, got {seconds!r}")
        delays[point] = value
    return delays


# Read once per process: a worker's environment does not change while it runs.
_DELAYS = parse_delays(os.environ.get(ENV_DELAYS, ""))


def _enter(point: str) -> float:
    seconds = _DELAYS.get(point, 0.0)
    if seconds:
        mark_dir = os.environ.get(ENV_MARK_DIR)
        if mark_dir:
            (Path(mark_dir) / f"{point.partition(':')[0]}.{os.getpid()}").touch()
    return seconds


def pause(point: str) -> None:
    """Block this thread for the point's delay (a slow disk, a stuck call); no-op when unset."""
    seconds = _enter(point)
    if seconds:
        time.sleep(seconds)


async def apause(point: str) -> None:
    """`pause` for the actor's event loop: the caller holds the lock, the loop stays responsive."""
    seconds = _enter(point)
    if seconds:
        await asyncio.sleep(seconds)
