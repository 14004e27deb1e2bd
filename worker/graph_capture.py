"""Capture one CUDA graph of a forward pass, timed by part (preparation, warm-up, capture).

``torch.cuda.graph`` (the context manager) also empties torch's pinned host-memory cache on every
capture. The engine pins one adapter-sized block at start-up so the first adapter load does not pay
for page-locking (tens of ms, holding the driver while the step thread launches), and captures made
while serving would throw away every block the adapter loads return to that cache. So this calls
the graph's ``capture_begin`` / ``capture_end`` itself, with the same device-side preparation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorafleet.worker.graph_schedule import GraphKey


@dataclass(frozen=True)
class GraphTiming:
    """Where one graph's capture time went (host seconds)."""

    key: GraphKey
    at: str  # "start" (before the engine served), "idle" (while it held no sequence) or "recapture"
    prep_s: float  # cached device memory handed back so the graph's pool can grow
    warmup_s: float  # one eager pass and a device sync: compiles or loads kernel variants, sets up cuBLAS
    capture_s: float  # recording the pass into the graph

    @property
    def total_s(self) -> float:
        return self.prep_s + self.warmup_s + self.capture_s


def capture_graph(
    forward: Callable[[], None],
    *,
    key: GraphKey,
    at: str,
    device: torch.device,
    stream: torch.cuda.Stream,
    pool: tuple | None,
) -> tuple[torch.cuda.CUDAGraph, GraphTiming]:
    """Warm ``forward`` up eagerly, then record it on ``stream`` into a new graph sharing ``pool``.

    The capture checks only this thread's CUDA calls ("thread_local"): a capture made while serving
    shares the process with other threads (the adapter loader's pinned-memory calls, the server's),
    and under "global" any of their calls that might sync would abort it.
    """
    t0 = time.perf_counter()
    forward()
    torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    # Memory the warm-up (or eager steps) left cached cannot serve the graph's private pool, and the
    # allocator cannot hand it back once the capture has begun: back it goes now, as in
    # torch.cuda.graph, so capturing needs no more memory than it did.
    torch.cuda.empty_cache()
    t2 = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            forward()
        finally:
            graph.capture_end()
    t3 = time.perf_counter()
    return graph, GraphTiming(key, at, t2 - t1, t1 - t0, t3 - t2)
