"""Seconds per engine start-up phase, logged as each ends, and a per-family digest of graph captures.

The log lines say where a start-up's time went (model load, KV cache, each family of CUDA graphs,
split into warm-up passes and captures) on the machine that served, without a profiler attached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from lorafleet.worker.graph_capture import GraphTiming

log = logging.getLogger("lorafleet.worker.startup")


class StartupTimes:
    """Ordered ``{phase: seconds}``; a phase that raised is not recorded (the engine did not start)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float, detail: str = "") -> None:
        if name in self.seconds:
            raise ValueError(f"start-up phase {name!r} recorded twice")
        self.seconds[name] = seconds
        log.info("engine start-up: %s %.2f s%s", name, seconds, f" ({detail})" if detail else "")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def capture_digest(timings: Iterable[GraphTiming]) -> dict[str, dict[str, float]]:
    """Per family ("decode", "prefill"): graphs, total seconds and its parts.

    ``first_warmup_s`` is the family's first warm-up pass alone: it compiles (or loads from Triton's
    disk cache) the kernels the family shares, so a large value there is compile time.
    """
    out: dict[str, dict[str, float]] = {}
    for t in timings:
        fam = out.setdefault(
            t.key.kind,
            {"graphs": 0, "seconds": 0.0, "prep_s": 0.0, "warmup_s": 0.0, "capture_s": 0.0},
        )
        fam.setdefault("first_warmup_s", t.warmup_s)
        fam["graphs"] += 1
        fam["seconds"] += t.total_s
        fam["prep_s"] += t.prep_s
        fam["warmup_s"] += t.warmup_s
        fam["capture_s"] += t.capture_s
    return out


def describe(family: dict[str, float]) -> str:
    """One log line's detail for ``capture_digest``'s entry of a family."""
    return (
        f"{int(family['graphs'])} graphs: warm-up {family['warmup_s']:.2f} s "
        f"(first {family['first_warmup_s']:.2f} s), capture {family['capture_s']:.2f} s, "
        f"cache release {family['prep_s']:.2f} s"
    )


def log_captures(times: StartupTimes, timings: Iterable[GraphTiming], pending: int) -> None:
    """Record the start-up captures as one phase per family, then log the start-up's total."""
    digest = capture_digest(t for t in timings if t.at == "start")
    for kind in ("prefill", "decode"):
        if kind in digest:
            times.add(f"{kind} graphs", digest[kind]["seconds"], describe(digest[kind]))
    later = f"; {pending} prefill graphs left for idle moments" if pending else ""
    log.info("engine start-up: %.2f s in all%s", times.total_s, later)
