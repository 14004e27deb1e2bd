"""Which CUDA graphs an engine captures at start-up, and which it leaves for idle moments (torch-free).

Capturing a graph costs a warm-up forward pass plus the capture itself; for the 7B shape the
prefill-bucket graphs (up to 36 of them) took the engine's start-up from about 22 s to 36 s. With
``graph_capture="idle"`` start-up captures only what a first burst needs most: every decode bucket
and the prefill buckets up to ``START_MAX_ROWS`` rows. The larger prefill buckets are captured one
graph at a time while the engine holds no sequence; until a step's graph exists, that step runs
eagerly (correct, only slower on the host).

Order matters twice. The graphs share one memory pool, so capturing the largest first sizes the
pool once and lets the smaller ones reuse it (as start-up always did). And a graph with the LoRA
kernels saves far more than one without: eagerly a 512-row step with an adapter took 46.6 ms
against 14.4 ms as a graph, without one 14.8 ms against 10.9 ms (H200, docs/benchmarks.md), so the
idle captures take every LoRA graph before any backbone-only one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

GRAPH_CAPTURE_MODES = ("start", "idle")
# The four fine prefill buckets (32, 64, 128, 256): short prompts and small chunks, where the eager
# host time dwarfs the GPU time (16 rows: 19 ms eager for 4 ms of GPU work), so they pay off first.
START_MAX_ROWS = 256


class GraphKey(NamedTuple):
    """One graph: a decode batch bucket or a prefill token-row bucket, with or without LoRA."""

    kind: str  # "decode" | "prefill"
    size: int  # sequences (decode) or token rows (prefill)
    lora: bool


def _check_sizes(name: str, sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sizes)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"{name}: bucket sizes must be integers >= 1, got {s!r}")
    if any(a >= b for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"{name}: bucket sizes must be strictly increasing, got {sizes}")
    return sizes


class CaptureSchedule:
    """The capture order: ``startup()`` once, then ``next_idle()`` / ``mark_done`` one graph at a time.

    A graph whose capture failed is dropped with ``mark_failed``; its bucket then keeps running
    eagerly. ``abandon`` drops every graph still pending (after a failure that may recur, like an
    out-of-memory error, trying the next one would only fail again while serving).
    """

    def __init__(
        self,
        decode_sizes: Sequence[int],
        prefill_sizes: Sequence[int],
        mode: str = "start",
        start_max_rows: int = START_MAX_ROWS,
    ) -> None:
        if mode not in GRAPH_CAPTURE_MODES:
            raise ValueError(f"graph_capture must be one of {GRAPH_CAPTURE_MODES}, got {mode!r}")
        if isinstance(start_max_rows, bool) or not isinstance(start_max_rows, int) or start_max_rows < 0:
            raise ValueError(f"start_max_rows must be an integer >= 0, got {start_max_rows!r}")
        decode = _check_sizes("decode_sizes", decode_sizes)
        prefill = _check_sizes("prefill_sizes", prefill_sizes)
        self.mode = mode
        early = prefill if mode == "start" else tuple(s for s in prefill if s <= start_max_rows)
        late = tuple(s for s in prefill if s not in early)
        both = (False, True)
        self._startup = tuple(GraphKey("prefill", s, lora) for s in reversed(early) for lora in both) + tuple(
            GraphKey("decode", s, lora) for s in reversed(decode) for lora in both
        )
        self._pending = [GraphKey("prefill", s, lora) for lora in (True, False) for s in reversed(late)]
        self._order = self._startup + tuple(self._pending)
        self._done: set[GraphKey] = set()
        self._failed: set[GraphKey] = set()

    def startup(self) -> tuple[GraphKey, ...]:
        """The graphs to capture before the engine serves, in capture order."""
        return self._startup

    def pending(self) -> tuple[GraphKey, ...]:
        """The graphs left for idle moments, in capture order."""
        return tuple(self._pending)

    def next_idle(self) -> GraphKey | None:
        return self._pending[0] if self._pending else None

    def mark_done(self, key: GraphKey) -> None:
        self._settle(key)
        self._done.add(key)

    def mark_failed(self, key: GraphKey) -> None:
        self._settle(key)
        self._failed.add(key)

    def abandon(self) -> None:
        """Give up every pending graph: their buckets run eagerly from now on."""
        self._failed.update(self._pending)
        self._pending.clear()

    def _settle(self, key: GraphKey) -> None:
        if key in self._done or key in self._failed:
            raise ValueError(f"graph {key} was already settled")
        if key not in self._order:
            raise ValueError(f"graph {key} is not in this schedule")
        if key in self._pending:
            self._pending.remove(key)

    def captured(self) -> tuple[GraphKey, ...]:
        """The graphs captured so far, in schedule order (what a recapture must capture again)."""
        return tuple(k for k in self._order if k in self._done)

    @property
    def failed(self) -> frozenset[GraphKey]:
        return frozenset(self._failed)
