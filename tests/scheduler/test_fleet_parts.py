"""FleetConfig validation and the head's per-request bookkeeping (no Ray needed)."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.scheduler.errors import RequestFailedError, UnknownAdapterError
from lorafleet.scheduler.fleet_config import FleetConfig
from lorafleet.scheduler.tracked_request import Failure, TrackedRequest
from lorafleet.worker.types import FinishReason, Request, SamplingParams, SequenceState, TokenDelta


def test_fleet_config_defaults_and_validation() -> None:
    cfg = FleetConfig(model_dir="/m")
    assert (cfg.min_workers, cfg.max_workers, cfg.policy, cfg.worker_num_gpus) == (1, 1, "packing", 0.0)
    assert FleetConfig(model_dir="/m", device="cuda").worker_num_gpus == 1.0
    assert cfg.pack_batch_target is None
    assert (
        FleetConfig(model_dir="/m", pack_batch_target=32, engine={"max_batch_size": 32}).pack_batch_target
        == 32
    )
    bad = [
        ({"model_dir": ""}, "model_dir"),
        ({"device": "tpu"}, "device must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"min_workers": 0}, "min_workers must be an integer >= 1"),
        ({"min_workers": 3, "max_workers": 2}, r"max_workers \(2\) must be >= min_workers \(3\)"),
        ({"policy": "fastest"}, "policy must be one of"),
        ({"max_queue": 0}, "max_queue"),
        ({"consolidation_interval_s": 0}, "consolidation_interval_s must be > 0"),
        ({"idle_release_s": -1}, "idle_release_s must be >= 0"),
        ({"engine": {1: 2}}, "engine must be a mapping"),
        ({"ray_address": ""}, "ray_address"),
        ({"max_start_attempts": 0}, "max_start_attempts"),
        ({"pack_batch_target": 0}, "pack_batch_target must be an integer >= 1"),
        ({"pack_batch_target": 2.5}, "pack_batch_target must be an integer >= 1"),
        (
            {"pack_batch_target": 33, "engine": {"max_batch_size": 32}},
            r"pack_batch_target \(33\) must be <= the engine's max_batch_size \(32\)",
        ),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            FleetConfig(**{"model_dir": "/m", **overrides})


def test_fleet_config_from_mapping_refuses_unknown_keys() -> None:
    assert FleetConfig.from_mapping({"model_dir": "/m", "max_workers": 3}).max_workers == 3
    with pytest.raises(ValueError, match="unknown fleet config keys: max_wrokers"):
        FleetConfig.from_mapping({"model_dir": "/m", "max_wrokers": 3})


def test_errors_read_well() -> None:
    assert str(UnknownAdapterError("unknown adapter 'x'")) == "unknown adapter 'x'"
    assert isinstance(UnknownAdapterError("x"), KeyError)
    err = RequestFailedError("r1", "boom")
    assert (err.request_id, err.reason, str(err)) == ("r1", "boom", "request r1 failed: boom")


def _tracked() -> TrackedRequest:
    request = Request("r", (1, 2, 3), "a", SamplingParams(max_new_tokens=10, logprobs=True))
    return TrackedRequest(request)


def test_delivered_tokens_make_the_resume_state() -> None:
    async def main():
        tr = _tracked()
        tr.deliver(TokenDelta("r", (7, 8), "ab", (-0.1, -0.2)), 1.0)
        tr.deliver(TokenDelta("r", (9,), "c", (-0.3,)), 2.0)
        state = tr.resume_state()
        assert state == SequenceState(tr.request, (7, 8, 9), (-0.1, -0.2, -0.3), "abc")
        assert (tr.num_tokens, tr.remaining_tokens) == (6, 7)
        assert [tr.stream.get_nowait()[1] for _ in range(2)] == [1.0, 2.0]
        tr.fail("gone")
        assert tr.finished and tr.stream.get_nowait() == Failure("gone")

    asyncio.run(main())


def test_catch_up_delivers_exactly_the_tokens_the_caller_missed() -> None:
    async def main():
        tr = _tracked()
        tr.deliver(TokenDelta("r", (7,), "a", (-0.1,)), 1.0)
        exported = SequenceState(tr.request, (7, 8, 9), (-0.1, -0.2, -0.3), "abc")
        missing = tr.catch_up(exported)
        assert missing == TokenDelta("r", (8, 9), "bc", (-0.2, -0.3), num_prompt_tokens=3)
        tr.deliver(missing, 2.0)
        assert tr.catch_up(exported) is None
        with pytest.raises(RuntimeError, match="disagree"):
            tr.catch_up(SequenceState(tr.request, (5, 8, 9, 10)))
        tr.finish_aborted()
        assert tr.finished and tr.tokens == [7, 8, 9]
        last = [tr.stream.get_nowait() for _ in range(3)][-1][0]
        assert last.finish_reason is FinishReason.ABORT

    asyncio.run(main())


def test_repointing_an_adapter_in_use_is_refused_without_naming_anyone(demo) -> None:
    """A name that unfinished requests use cannot move to another directory (FAILED_PRECONDITION):
    their sequences would run one version while new requests got another, and the refusal must not
    name another client's request."""
    from types import SimpleNamespace

    from lorafleet.scheduler.adapter_registry import AdapterRegistry
    from lorafleet.scheduler.errors import AdapterInUseError
    from lorafleet.scheduler.fleet import Fleet
    from lorafleet.worker.engine_config import EngineConfig
    from lorafleet.worker.model_config import ModelConfig

    runtime = SimpleNamespace(requests={})
    registry = AdapterRegistry(EngineConfig(), ModelConfig.from_dir(demo.model_dir))
    fleet = Fleet(FleetConfig(model_dir=str(demo.model_dir)), runtime, registry, owns_ray=False)
    first, second = (str(p) for p in list(demo.adapters.values())[:2])
    fleet.register_adapter("tune", first, confined=False)
    busy = TrackedRequest(Request("someone-elses-request", (1, 2), "tune"))
    runtime.requests[busy.request_id] = busy
    with pytest.raises(AdapterInUseError) as err:
        fleet.register_adapter("tune", second, confined=False)
    assert "1 unfinished request" in str(err.value) and "someone-elses-request" not in str(err.value)
    assert fleet.list_adapters()["tune"] == first
    fleet.register_adapter("tune", first, confined=False)  # the same directory again changes nothing: allowed
    fleet.register_adapter("other", second, confined=False)  # other names are not affected
    busy.finished = True
    fleet.register_adapter("tune", second, confined=False)
    assert fleet.list_adapters()["tune"] == second


def test_registration_refuses_nan_weights(demo, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from lorafleet.scheduler.adapter_registry import AdapterRegistry
    from lorafleet.worker.engine_config import EngineConfig
    from lorafleet.worker.model_config import ModelConfig

    path = tmp_path / "nan"
    shutil.copytree(next(iter(demo.adapters.values())), path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    registry = AdapterRegistry(EngineConfig(), ModelConfig.from_dir(demo.model_dir))
    with pytest.raises(ValueError, match=f"tensor {key} holds NaN or Inf"):
        registry.register("bad", str(path))
    assert "bad" not in registry


def test_api_registrations_are_confined_to_the_adapter_roots(demo, tmp_path) -> None:
    """Only folders inside a root (symlinks resolved first) may be registered through the API, and a
    refusal names neither the path nor what it resolves to."""
    import os
    import shutil
    from types import SimpleNamespace

    from lorafleet.scheduler.adapter_registry import AdapterRegistry
    from lorafleet.scheduler.fleet import Fleet
    from lorafleet.worker.engine_config import EngineConfig
    from lorafleet.worker.model_config import ModelConfig

    root = tmp_path / "root"
    inside = root / "tenant-a"
    shutil.copytree(next(iter(demo.adapters.values())), inside)
    outside = tmp_path / "secret-place"
    shutil.copytree(next(iter(demo.adapters.values())), outside)
    (root / "sneaky").symlink_to(outside)
    model = ModelConfig.from_dir(demo.model_dir)

    def fleet_with(roots: tuple[str, ...]) -> Fleet:
        registry = AdapterRegistry(EngineConfig(), model, roots)
        config = FleetConfig(model_dir=str(demo.model_dir), adapter_roots=roots)
        return Fleet(config, SimpleNamespace(requests={}), registry, owns_ray=False)

    fleet = fleet_with((str(root),))
    fleet.register_adapter("a", str(inside))
    fleet.register_adapter("a2", f"{root}/../root/tenant-a")  # normalised before the check
    for name, path in [
        ("b", str(outside)),
        ("c", str(root / "sneaky")),  # a symlink inside a root that points out of it
        ("d", "~/"),
        ("e", "/proc/self/cwd"),
        ("f", f"{root}/../secret-place"),
    ]:
        with pytest.raises(ValueError, match="outside the server's adapter roots") as err:
            fleet.register_adapter(name, path)
        for leak in (str(outside), str(tmp_path), os.path.expanduser("~"), os.getcwd()):
            assert leak not in str(err.value)
    # Inside a root the usual checks apply, and their messages may name the folder.
    with pytest.raises(ValueError, match=r"adapter_config\.json is missing"):
        fleet.register_adapter("g", str(root))
    # The operator's own start-up adapters are not confined.
    fleet.register_adapter("ops", str(outside), confined=False)
    with pytest.raises(ValueError, match="registering adapters through the API is off"):
        fleet_with(()).register_adapter("h", str(inside))


def test_alternatives_survive_the_resume_state_and_catch_up() -> None:
    async def main():
        sampling = SamplingParams(max_new_tokens=10, logprobs=True, top_logprobs=2)
        tr = TrackedRequest(Request("r", (1, 2, 3), None, sampling))
        top7, top8 = ((7, -0.1), (4, -2.0)), ((8, -0.2), (1, -3.0))
        tr.deliver(TokenDelta("r", (7,), "a", (-0.1,), new_top_logprobs=(top7,)), 1.0)
        assert tr.resume_state().output_top_logprobs == (top7,)
        exported = SequenceState(tr.request, (7, 8), (-0.1, -0.2), "ab", output_top_logprobs=(top7, top8))
        missing = tr.catch_up(exported)
        assert missing is not None and missing.new_top_logprobs == (top8,)
        tr.deliver(missing, 2.0)
        assert tr.top_logprobs == [top7, top8]

    asyncio.run(main())
