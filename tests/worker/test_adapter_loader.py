"""Background adapter loads: off the step's thread, failures reach the request, FCFS, no spinning."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorafleet.worker.adapter_cache as adapter_cache_module
from lorafleet.worker import Engine, Request, SamplingParams
from lorafleet.worker.adapter_cache import AdapterCache
from lorafleet.worker.adapters import AdapterFormatError
from lorafleet.worker.demo_assets import make_demo
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.model_config import ModelConfig

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    return make_demo(tmp_path_factory.mktemp("loader") / "demo", num_adapters=3, seed=3)


@pytest.fixture(scope="module")
def config(demo) -> ModelConfig:
    return ModelConfig.from_dir(demo.model_dir)


class GatedLoads:
    """Wraps ``read_packed``: records the thread of every load and holds it until ``open()``."""

    def __init__(self, fail: str | None = None) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()  # a load has reached the reader (the thread may start late)
        self.threads: list[str] = []
        self.names: list[str] = []
        self.fail = fail
        self._real = adapter_cache_module.read_packed

    def __call__(self, path, model_config, pool, **kwargs):
        self.threads.append(threading.current_thread().name)
        self.names.append(kwargs.get("name"))
        self.entered.set()
        assert self.gate.wait(30.0), "test never opened the gate"
        if kwargs.get("name") == self.fail:
            raise AdapterFormatError(f"adapter {path}: the disk said no")
        return self._real(path, model_config, pool, **kwargs)

    def open(self) -> None:
        self.gate.set()


@pytest.fixture
def gated(monkeypatch) -> Iterator[GatedLoads]:
    loads = GatedLoads()
    monkeypatch.setattr(adapter_cache_module, "read_packed", loads)
    yield loads
    loads.open()  # never leave a loader thread blocked


def make_cache(demo, config, *, host_cache_bytes: int = 1 << 30) -> AdapterCache:
    pool = LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), 2, 16, torch.float32, "cpu")
    cache = AdapterCache(
        config, pool, host_cache_bytes=host_cache_bytes, dtype=torch.float32, background_loads=True
    )
    for name, path in demo.adapters.items():
        cache.register(name, path)
    return cache


def test_load_runs_on_the_loader_thread_once(demo, config, gated) -> None:
    cache = make_cache(demo, config)
    assert not cache.can_acquire("adapter-0") and cache.loading()
    assert not cache.can_acquire("adapter-0")  # asking again does not start a second load
    cache.wait_for_loads(0.01)  # times out: the load is held
    assert cache.loading() and cache.slot_of("adapter-0") is None
    gated.open()
    cache.wait_for_loads(30.0)
    assert not cache.loading() and cache.can_acquire("adapter-0")
    assert cache.acquire("adapter-0") == 0 and cache.loads == 1 and cache.host_hits == 0
    assert gated.names == ["adapter-0"]
    assert (
        gated.threads[0].startswith("adapter-loader") and gated.threads[0] != threading.current_thread().name
    )
    assert cache.pool.get(0, "q_proj").ranks[0] == 8  # adapter-0: r=8 on q_proj
    (seconds,) = cache.take_load_seconds()
    assert seconds > 0
    cache.close()


def test_direct_acquire_waits_for_the_load_and_zero_host_budget_still_serves(demo, config, gated) -> None:
    cache = make_cache(demo, config, host_cache_bytes=0)
    assert not cache.can_acquire("adapter-1")
    threading.Timer(0.05, gated.open).start()
    assert cache.acquire("adapter-1") == 0  # blocks on the same in-flight load, no second read
    assert cache.loads == 1 and gated.names == ["adapter-1"]
    # With no host budget a finished load is still held for its request until uploaded.
    assert not cache.can_acquire("adapter-2")
    cache.wait_for_loads(30.0)
    assert cache.can_acquire("adapter-2") and cache.acquire("adapter-2") == 1 and cache.loads == 2
    cache.close()


def test_failed_load_raises_once_with_the_reason_then_retries(demo, config, gated) -> None:
    gated.fail = "adapter-0"
    cache = make_cache(demo, config)
    assert not cache.can_acquire("adapter-0")
    gated.open()
    cache.wait_for_loads(30.0)
    assert cache.can_acquire("adapter-0")  # so the scheduler calls acquire, which raises
    with pytest.raises(AdapterFormatError, match="the disk said no"):
        cache.acquire("adapter-0")
    assert cache.resident() == () and cache.misses == 0
    assert not cache.can_acquire("adapter-0")  # the next request reads the disk again
    cache.wait_for_loads(30.0)
    assert gated.names == ["adapter-0", "adapter-0"]
    cache.close()


@pytest.mark.parametrize("background", [True, False])
def test_nan_weights_are_refused_by_name_and_huge_finite_ones_accepted(
    demo, config, tmp_path, background
) -> None:
    # The loader checks finiteness with one min/max pass over the packed buffer (huge finite values,
    # which overflowed the float32 sum used before, pass); a failure falls back to the per-tensor
    # check that names the tensor.
    cache = make_cache(demo, config)
    cache.background_loads = background
    for label, value in (("nan", float("nan")), ("huge", 3e38)):
        path = shutil.copytree(demo.adapters["adapter-1"], tmp_path / label)
        file = str(path / "adapter_model.safetensors")
        tensors = load_file(file)
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
        tensors[key][0, :2] = value
        save_file(tensors, file)
        cache.register(label, path)
    with pytest.raises(AdapterFormatError, match="layer 1 down_proj lora_B holds NaN or Inf"):
        cache.acquire("nan")
    assert cache.acquire("huge") == 0 and cache.pool.get(1, "down_proj").b[0, 0, 0] == 3e38
    cache.close()


def test_unregister_during_a_load_drops_its_result(demo, config, gated) -> None:
    cache = make_cache(demo, config)
    assert not cache.can_acquire("adapter-0")
    cache.unregister("adapter-0")
    assert not cache.loading()
    gated.open()
    cache.register("adapter-0", demo.adapters["adapter-0"])
    assert not cache.can_acquire("adapter-0")  # a fresh load for the new registration
    cache.wait_for_loads(30.0)
    assert cache.acquire("adapter-0") == 0 and cache.loads == 1
    cache.close()


def make_engine(demo, background: bool) -> Engine:
    engine = Engine.from_pretrained(demo.model_dir, max_batch_size=4)
    engine.adapters.background_loads = background
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)
    return engine


def run(
    engine: Engine, max_steps: int = 500
) -> tuple[dict[str, list[int]], dict[str, str | None], list[set]]:
    tokens: dict[str, list[int]] = {}
    errors: dict[str, str | None] = {}
    per_step: list[set] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        got = set()
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.new_token_ids)
            got.add(d.request_id)
            if d.finish_reason is not None:
                errors[d.request_id] = d.error
        per_step.append(got)
    return tokens, errors, per_step


REQUESTS = [("r0", None), ("r1", "adapter-0"), ("r2", None), ("r3", "adapter-1")]


def add_all(engine: Engine) -> None:
    for i, (rid, adapter) in enumerate(REQUESTS):
        engine.add_request(Request(rid, (5 + i, 17, 33, 9 + i), adapter, GREEDY))


@pytest.fixture(scope="module")
def reference(demo) -> dict[str, list[int]]:
    """Tokens with loads at admission (module scope: set up before any load is gated)."""
    engine = make_engine(demo, background=False)
    add_all(engine)
    tokens, errors, per_step = run(engine)
    assert set(errors.values()) == {None} and per_step[0] == {rid for rid, _ in REQUESTS}
    return tokens


def test_engine_keeps_stepping_while_the_head_loads_and_admits_fcfs(demo, reference, gated) -> None:
    engine = make_engine(demo, background=True)
    add_all(engine)
    early: list[int] = []
    for _ in range(3):  # r1's adapter is loading: r0 keeps running, r1 waits and so does r2 (FCFS)
        deltas = engine.step()
        assert {d.request_id for d in deltas} == {"r0"}
        early += [t for d in deltas for t in d.new_token_ids]
        assert [s.request_id for s in engine.scheduler.running] == ["r0"]
    assert gated.entered.wait(10.0), "the loader thread never started the load"
    assert gated.names == ["adapter-0"]  # only the head's adapter is being read
    gated.open()
    tokens, errors, per_step = run(engine)
    tokens["r0"] = early + tokens.get("r0", [])
    assert set(errors.values()) == {None}
    first = {rid: next(i for i, s in enumerate(per_step) if rid in s) for rid, _ in REQUESTS if rid != "r0"}
    assert first["r1"] <= first["r2"] and first["r1"] <= first["r3"]
    assert tokens == reference  # the same tokens as with loads at admission


def test_failed_background_load_fails_only_its_request(demo, gated) -> None:
    gated.fail = "adapter-0"
    engine = make_engine(demo, background=True)
    add_all(engine)
    gated.open()
    tokens, errors, _ = run(engine)
    assert errors["r1"] is not None and "the disk said no" in errors["r1"] and "adapter-0" in errors["r1"]
    assert tokens.get("r1", []) == []
    assert all(errors[r] is None and len(tokens[r]) == GREEDY.max_new_tokens for r in ("r0", "r2", "r3"))


def test_engine_waits_instead_of_spinning_when_only_loads_are_pending(demo, gated, monkeypatch) -> None:
    engine = make_engine(demo, background=True)
    engine.add_request(Request("w", (5, 6, 7), "adapter-1", GREEDY))
    waits: list[float] = []
    real_wait = engine.adapters.wait_for_loads

    def spy(timeout_s: float) -> None:
        waits.append(timeout_s)
        real_wait(timeout_s)

    monkeypatch.setattr(engine.adapters, "wait_for_loads", spy)
    t0 = time.perf_counter()
    for _ in range(4):
        assert engine.step() == []
    elapsed = time.perf_counter() - t0
    assert len(waits) == 4 and all(0 < w <= 0.05 for w in waits)
    assert elapsed >= 4 * min(waits) * 0.9  # each idle step blocked rather than returning at once
    gated.open()
    tokens, errors, _ = run(engine)
    assert errors == {"w": None} and len(tokens["w"]) == GREEDY.max_new_tokens
    waits.clear()
    engine.add_request(Request("base", (5, 6), None, GREEDY))
    run(engine)
    assert waits == []  # no load in flight: no waiting at all


def test_loader_thread_keeps_torch_on_one_core_and_leaves_other_threads_alone(
    demo, config, monkeypatch
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the test means something on a one-core machine too
    try:
        seen: list[int] = []
        real = adapter_cache_module.read_packed

        def spy(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)

        monkeypatch.setattr(adapter_cache_module, "read_packed", spy)
        cache = make_cache(demo, config)
        assert not cache.can_acquire("adapter-0")
        cache.wait_for_loads(30.0)
        assert cache.acquire("adapter-0") == 0 and seen == [1]
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert torch.get_num_threads() == 2 and later == [2]
        cache.close()
    finally:
        torch.set_num_threads(before)


def test_pinned_buffers_reserved_for_the_host_cache_and_one_load() -> None:
    mb = 1 << 20
    rule = adapter_cache_module.pinned_buffers_to_reserve
    assert rule(0, 128 * mb) == 1  # no host cache: the load in flight
    assert rule(300 * mb, 128 * mb) == 3  # two cached + one loading
    assert rule(64 << 30, 128 * mb) == adapter_cache_module.MAX_RESERVED_PINNED
    assert rule(1, 0) == 2  # a degenerate size never divides by zero


def test_reserving_pinned_buffers_is_a_no_op_off_cuda(config) -> None:
    pool = LoraSlotPool(config.num_hidden_layers, config.lora_shapes(), 2, 8, torch.float32, "cpu")
    cache = AdapterCache(config, pool, host_cache_bytes=1 << 30, dtype=torch.float32)
    assert cache.reserve_pinned_buffers() == 0
