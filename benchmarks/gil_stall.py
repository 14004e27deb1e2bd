"""How much a job on another thread (an adapter load) slows a Python loop on this one (the step).

Python runs one thread at a time: the step thread waits whenever the job holds the global lock, up to
the switch interval (5 ms) at a time, and again after each torch call that released the lock. The
stand-in step is a Python loop of small torch operations, the shape of an eager engine step (about
a thousand small launches on a GPU); the heartbeat is a bare Python loop whose largest gap bounds
how long the job kept the lock at once. Both are measured alone first, so the machine's own noise
(other processes) is shown beside the job's effect.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch


def stand_in_step(x: torch.Tensor, ops: int) -> torch.Tensor:
    """``ops`` small torch operations (each releases and takes back the lock) with Python between."""
    for i in range(ops):
        x = x + (i & 7)
    return x


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _run_steps(ops: int, until: Callable[[], bool], min_steps: int) -> list[float]:
    x = torch.zeros(8)
    walls = []
    while len(walls) < min_steps or not until():
        t0 = time.perf_counter()
        x = stand_in_step(x, ops)
        walls.append(time.perf_counter() - t0)
    return walls


def _heartbeat(until: Callable[[], bool]) -> float:
    """The largest gap between two iterations of a bare Python loop, until ``until()``."""
    last = time.perf_counter()
    gap = 0.0
    while not until():
        now = time.perf_counter()
        gap = max(gap, now - last)
        last = now
    return gap


def _for(seconds: float) -> Callable[[], bool]:
    end = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= end


def _beside(
    job: Callable[[], object], loop: Callable[[Callable[[], bool]], object], init: Callable[[], None] | None
) -> tuple[float, object]:
    """Run ``job`` on a new thread (set up by ``init``) while ``loop(done)`` runs here; (job seconds,
    what loop returned)."""
    seconds: list[float] = []
    error: list[BaseException] = []

    def target() -> None:
        if init is not None:
            init()
        t0 = time.perf_counter()
        try:
            job()
        except BaseException as e:  # re-raised on the caller's thread
            error.append(e)
        seconds.append(time.perf_counter() - t0)

    thread = threading.Thread(target=target, name="job")
    thread.start()
    out = loop(lambda: not thread.is_alive())
    thread.join()
    if error:
        raise error[0]
    return seconds[0], out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    job: Callable[[], object], *, reps: int, step_ops: int, thread_init: Callable[[], None] | None = None
) -> dict:
    """Steps and heartbeat beside ``reps`` runs of ``job`` each (on a new thread set up by
    ``thread_init``), then alone for as long, so that the machine's own noise shows beside it."""
    _beside(job, lambda done: None, thread_init)  # warm-up: allocator caches, page cache, lazy imports
    during: list[float] = []
    job_seconds: list[float] = []
    gaps: list[float] = []
    for _ in range(reps):
        seconds, walls = _beside(job, lambda done: _run_steps(step_ops, done, 1), thread_init)
        job_seconds.append(seconds)
        during += walls  # type: ignore[arg-type]
        seconds, gap = _beside(job, _heartbeat, thread_init)
        job_seconds.append(seconds)
        gaps.append(gap)  # type: ignore[arg-type]
    alone = _run_steps(step_ops, _for(sum(during)), len(during))
    span = statistics.median(job_seconds)
    alone_gaps = [_heartbeat(_for(span)) for _ in range(reps)]
    return {
        "step_ops": step_ops,
        "job_median_ms": _ms(span),
        "steps (alone / during)": f"{len(alone)} / {len(during)}",
        "step p50 ms (alone / during)": f"{_ms(statistics.median(alone))} / {_ms(statistics.median(during))}",
        "step p99 ms (alone / during)": f"{_ms(_pct(alone, 0.99))} / {_ms(_pct(during, 0.99))}",
        "step max ms (alone / during)": f"{_ms(max(alone))} / {_ms(max(during))}",
        "heartbeat max gap per job, median ms (alone / during)": (
            f"{_ms(statistics.median(alone_gaps))} / {_ms(statistics.median(gaps))}"
        ),
        "heartbeat max gap ms (alone / during)": f"{_ms(max(alone_gaps))} / {_ms(max(gaps))}",
    }
