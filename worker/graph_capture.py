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
    at: str  # "start" (before the engine served) or "idle" (captured while it held no sequence)
    prep_s: float  # device sync, and cached device memory handed back so the graph's pool can grow
    warmup_s: float  # one eager pass: compiles or loads the kernels' variants, sets up cuBLAS
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

    The capture checks only this thread's CUDA calls ("thread_local"): an idle capture can overlap an
    adapter read on the loader thread, whose pinned-memory calls would abort a "global" capture.
    """
    t0 = time.perf_counter()
    torch.cuda.synchronize(device)
    # Memory cached by eager steps cannot serve the graph's private pool; the allocator cannot hand
    # it back once the capture has begun, so it goes back now (as torch.cuda.graph does).
    torch.cuda.empty_cache()
    t1 = time.perf_counter()
    forward()
    torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(*((pool,) if pool is not None else ()), capture_error_mode="thread_local")
        try:
            forward()
        finally:
            graph.capture_end()
    t3 = time.perf_counter()
    return graph, GraphTiming(key, at, t1 - t0, t2 - t1, t3 - t2)
