"""When the engine captures the graphs left for idle moments (``graph_capture="idle"``), on the CPU.

The CPU has no graphs, so a recording stand-in takes the runner's capture: these tests check the
engine's side of the contract (never while a sequence waits or runs, a pass left in flight drained
first, no overlap with an adapter load, one graph per ``generate`` call, a failed capture logged and
survived) and that a step whose bucket has no graph yet runs eagerly with unchanged outputs.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lorafleet.worker import Engine, EngineConfig, Request, SamplingParams
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.graph_capture import GraphTiming
from lorafleet.worker.graph_schedule import CaptureSchedule, GraphKey
from lorafleet.worker.startup_timing import StartupTimes, capture_digest, describe
from tests.worker.test_engine import make_engine

ADAPTERS = [None, "adapter-0", "adapter-1", None]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
IDLE_ORDER = [
    GraphKey("prefill", 1024, True),
    GraphKey("prefill", 512, True),
    GraphKey("prefill", 1024, False),
    GraphKey("prefill", 512, False),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("idle") / "demo", num_adapters=2, seed=2)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 23, 9, 31)]


@pytest.fixture(scope="module")
def reference(demo) -> list[tuple[int, ...]]:
    return [o.token_ids for o in make_engine(demo).generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)]


class RecordedCaptures:
    """Stands in for ``ModelRunner._capture``: records what the engine looked like at each capture."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[dict] = []
        self.fail = False

    def __call__(self, key: GraphKey, at: str) -> None:
        e = self.engine
        self.seen.append(
            {"key": key, "at": at, "seqs": len(e._seqs), "inflight": e._inflight is not None,
             "passes": e.runner.num_eager_steps}
        )  # fmt: skip
        if self.fail:
            raise RuntimeError("out of memory in the graph pool")
        e.runner.capture_timings.append(GraphTiming(key, at, 0.0, 0.0, 0.0))

    @property
    def keys(self) -> list[GraphKey]:
        return [s["key"] for s in self.seen]


def with_idle_graphs(engine: Engine) -> RecordedCaptures:
    """Give a CPU engine four prefill graphs to capture when idle, captured by a recorder."""
    runner = engine.runner
    runner.schedule = CaptureSchedule((), (512, 1024), "idle")
    runner._started = True
    recorder = RecordedCaptures(engine)
    runner._capture = recorder  # type: ignore[method-assign]
    return recorder


def test_idle_captures_wait_until_no_sequence_is_left(demo, reference) -> None:
    engine = make_engine(demo, async_scheduling=True)
    rec = with_idle_graphs(engine)
    assert engine.has_idle_work()
    for i, (p, a) in enumerate(zip(prompts(), ADAPTERS)):
        engine.add_request(Request(f"r{i}", tuple(p), a, GREEDY))
    assert not engine.has_idle_work() and not engine.run_idle_work()
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
        assert not engine.run_idle_work() or not engine.has_unfinished()
    assert [tuple(tokens[f"r{i}"]) for i in range(len(ADAPTERS))] == reference
    while engine.run_idle_work():
        pass
    assert rec.keys == IDLE_ORDER
    assert all(s["seqs"] == 0 and not s["inflight"] and s["at"] == "idle" for s in rec.seen)
    assert not engine.has_idle_work() and engine.runner.schedule.captured() == tuple(IDLE_ORDER)


def test_generate_captures_one_graph_before_its_requests(demo, reference) -> None:
    engine = make_engine(demo)
    rec = with_idle_graphs(engine)
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert rec.keys == IDLE_ORDER[:1] and rec.seen[0]["passes"] == 0 and rec.seen[0]["seqs"] == 0
    engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert rec.keys == IDLE_ORDER[:2]


def test_a_bad_generate_call_captures_nothing(demo) -> None:
    engine = make_engine(demo)
    rec = with_idle_graphs(engine)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[5, 6], []])
    assert rec.seen == []


def test_a_pass_left_in_flight_is_drained_before_a_capture(demo, reference) -> None:
    engine = make_engine(demo, async_scheduling=True)
    rec = with_idle_graphs(engine)
    engine.add_request(Request("gone", tuple(prompts()[1]), "adapter-0", GREEDY))
    engine.step()  # queued, its tokens not collected yet
    engine.abort("gone")
    assert engine._inflight is not None and engine.has_idle_work()
    assert engine.run_idle_work()
    assert rec.seen[0]["inflight"] is False and engine._inflight is None
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_no_capture_while_an_adapter_loads(demo, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(demo)
    rec = with_idle_graphs(engine)
    waits: list[float] = []
    monkeypatch.setattr(engine.adapters, "loading", lambda: True)
    monkeypatch.setattr(engine.adapters, "wait_for_loads", waits.append)
    assert engine.has_idle_work() and not engine.run_idle_work()
    assert rec.seen == [] and waits == [0.005]
    monkeypatch.undo()
    assert engine.run_idle_work() and rec.keys == IDLE_ORDER[:1]


def test_a_failed_idle_capture_is_logged_and_serving_goes_on(demo, reference, caplog) -> None:
    engine = make_engine(demo)
    rec = with_idle_graphs(engine)
    rec.fail = True
    with caplog.at_level(logging.WARNING, logger="lorafleet.worker.model_runner"):
        assert not engine.run_idle_work()
    assert "idle capture of" in caplog.text and "out of memory in the graph pool" in caplog.text
    assert engine.runner.idle_capture_error == "RuntimeError: out of memory in the graph pool"
    assert engine.runner.schedule.failed == frozenset(IDLE_ORDER)  # the rest would likely fail too
    assert not engine.has_idle_work()
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert [o.token_ids for o in outs] == reference and len(rec.seen) == 1


def test_a_step_whose_bucket_has_no_graph_runs_eagerly(demo, reference) -> None:
    engine = make_engine(demo)
    engine.runner.token_sizes = (32, 64, 128)  # buckets without graphs, as before an idle capture
    outs = engine.generate(prompts(), adapters=ADAPTERS, sampling=GREEDY)
    assert [o.token_ids for o in outs] == reference
    runner = engine.runner
    assert runner.num_mixed_graph_steps == runner.num_graph_steps == 0
    assert 0 < runner.num_uncaptured_steps == runner.num_eager_steps


def test_cpu_engine_has_no_idle_work_and_times_its_start_up(demo) -> None:
    engine = make_engine(demo)
    assert not engine.has_idle_work() and not engine.run_idle_work()
    phases = engine.startup.seconds
    assert list(phases) == ["model load", "LoRA slots and adapter cache", "KV cache"]
    assert all(s >= 0 for s in phases.values()) and phases["model load"] > 0


@pytest.mark.parametrize("value", ["lazy", "", 1, None])
def test_graph_capture_is_validated(value) -> None:
    with pytest.raises(ValueError, match="graph_capture must be one of"):
        EngineConfig(graph_capture=value)


def test_graph_capture_from_a_mapping() -> None:
    assert EngineConfig.from_dict({"graph_capture": "idle"}).graph_capture == "idle"
    assert EngineConfig().graph_capture == "start"


def test_capture_digest_sums_each_family() -> None:
    timings = [
        GraphTiming(GraphKey("prefill", 256, False), "start", 0.5, 2.0, 0.25),
        GraphTiming(GraphKey("prefill", 256, True), "start", 0.5, 0.25, 0.5),
        GraphTiming(GraphKey("decode", 64, False), "start", 0.0, 1.5, 0.125),
    ]
    digest = capture_digest(timings)
    assert digest["prefill"] == {
        "graphs": 2,
        "seconds": 4.0,
        "prep_s": 1.0,
        "warmup_s": 2.25,
        "capture_s": 0.75,
        "first_warmup_s": 2.0,
    }
    assert digest["decode"]["graphs"] == 1 and digest["decode"]["first_warmup_s"] == 1.5
    assert describe(digest["prefill"]) == (
        "2 graphs: warm-up 2.25 s (first 2.00 s), capture 0.75 s, cache release 1.00 s"
    )


def test_startup_phases_are_recorded_once() -> None:
    times = StartupTimes()
    with times.phase("KV cache"):
        pass
    times.add("decode graphs", 1.5)
    assert list(times.seconds) == ["KV cache", "decode graphs"] and times.total_s >= 1.5
    with pytest.raises(ValueError, match="recorded twice"):
        times.add("KV cache", 0.1)
