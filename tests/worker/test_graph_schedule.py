"""The capture schedule: what start-up captures, and the order of the graphs left for idle moments."""

from __future__ import annotations

import pytest

from lorafleet.worker.graph_schedule import START_MAX_ROWS, CaptureSchedule, GraphKey
from lorafleet.worker.model_runner import graph_batch_sizes, graph_token_sizes

DECODE = (1, 2, 4)
PREFILL = (32, 64, 128, 256, 384, 512)


def prefill(size: int, lora: bool) -> GraphKey:
    return GraphKey("prefill", size, lora)


def test_start_mode_captures_everything_before_serving_largest_first() -> None:
    s = CaptureSchedule(DECODE, PREFILL, "start")
    startup = s.startup()
    assert [k for k in startup if k.kind == "prefill"] == [
        prefill(n, lora) for n in reversed(PREFILL) for lora in (False, True)
    ]
    # Decode graphs follow every prefill graph, largest first too (one shared pool, sized once).
    assert [k for k in startup if k.kind == "decode"] == [
        GraphKey("decode", n, lora) for n in reversed(DECODE) for lora in (False, True)
    ]
    assert startup.index(GraphKey("decode", 4, False)) == 2 * len(PREFILL)
    assert s.pending() == () and s.next_idle() is None


def test_idle_mode_leaves_large_prefill_buckets_lora_first() -> None:
    s = CaptureSchedule(DECODE, PREFILL, "idle")
    assert {k.size for k in s.startup() if k.kind == "prefill"} == {32, 64, 128, 256}
    assert sum(k.kind == "decode" for k in s.startup()) == 2 * len(DECODE)
    # Graphs with the LoRA kernels save the most host time, so all of them come first.
    assert s.pending() == (
        prefill(512, True),
        prefill(384, True),
        prefill(512, False),
        prefill(384, False),
    )


def test_idle_captures_advance_one_at_a_time() -> None:
    s = CaptureSchedule(DECODE, PREFILL, "idle")
    for key in s.startup():
        s.mark_done(key)
    seen = []
    while (key := s.next_idle()) is not None:
        seen.append(key)
        s.mark_done(key)
    assert seen == [prefill(512, True), prefill(384, True), prefill(512, False), prefill(384, False)]
    captured = s.captured()
    assert len(captured) == len(set(captured)) == 2 * (len(DECODE) + len(PREFILL))
    # A recapture redoes them in the original capture order: start-up's, then the idle ones.
    assert captured[: len(s.startup())] == s.startup()
    assert captured[len(s.startup()) :] == tuple(seen)


def test_a_failed_graph_stays_uncaptured_and_abandon_drops_the_rest() -> None:
    s = CaptureSchedule(DECODE, PREFILL, "idle")
    first = s.next_idle()
    assert first is not None
    s.mark_failed(first)
    assert first not in s.pending() and first in s.failed
    assert first not in s.captured()
    s.abandon()
    assert s.next_idle() is None
    assert len(s.failed) == 4


def test_settling_a_graph_twice_or_a_foreign_one_is_an_error() -> None:
    s = CaptureSchedule(DECODE, PREFILL, "idle")
    key = s.next_idle()
    assert key is not None
    s.mark_done(key)
    with pytest.raises(ValueError, match="already settled"):
        s.mark_done(key)
    with pytest.raises(ValueError, match="already settled"):
        s.mark_failed(key)
    with pytest.raises(ValueError, match="not in this schedule"):
        s.mark_done(prefill(1000, True))
    with pytest.raises(ValueError, match="not in this schedule"):
        s.mark_done(GraphKey("decode", 64, False))


@pytest.mark.parametrize(
    "decode,prefill_sizes,mode,limit,match",
    [
        (DECODE, PREFILL, "lazy", START_MAX_ROWS, "graph_capture must be one of"),
        (DECODE, PREFILL, "idle", -1, "start_max_rows"),
        (DECODE, PREFILL, "idle", True, "start_max_rows"),
        ((1, 0), PREFILL, "idle", START_MAX_ROWS, "decode_sizes: bucket sizes must be integers >= 1"),
        (DECODE, (64, 32), "idle", START_MAX_ROWS, "prefill_sizes: bucket sizes must be strictly increasing"),
        (DECODE, (32, 32), "start", START_MAX_ROWS, "strictly increasing"),
        (DECODE, (32.0,), "start", START_MAX_ROWS, "integers >= 1"),
    ],
)
def test_bad_schedules_are_refused(decode, prefill_sizes, mode, limit, match) -> None:
    with pytest.raises(ValueError, match=match):
        CaptureSchedule(decode, prefill_sizes, mode, limit)


def test_no_graphs_on_the_cpu_or_eager() -> None:
    s = CaptureSchedule((), (), "idle")
    assert s.startup() == () and s.next_idle() is None and s.captured() == ()


def test_start_max_rows_zero_leaves_every_prefill_bucket_to_idle_moments() -> None:
    s = CaptureSchedule(DECODE, PREFILL, "idle", start_max_rows=0)
    assert all(k.kind == "decode" for k in s.startup())
    assert len(s.pending()) == 2 * len(PREFILL)


def test_the_engine_default_buckets() -> None:
    """max_batch_size 64, 2,048 token rows: 18 decode and 8 prefill graphs at start-up, 28 left."""
    s = CaptureSchedule(graph_batch_sizes(64), graph_token_sizes(2048, 2048), "idle")
    assert len(s.startup()) == 18 + 8
    assert len(s.pending()) == 28
    assert s.next_idle() == prefill(2048, True)
    assert len(CaptureSchedule(graph_batch_sizes(64), graph_token_sizes(2048, 2048), "start").startup()) == 54
