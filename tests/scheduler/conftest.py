"""Fixtures for the runtime tests: the tiny demo model, its offline greedy outputs, a local Ray.

Each runtime test file gets one Ray session (module scope); workers are CPU actors with num_cpus=0
so three fit on a 2-core machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MAX_BATCH = 2


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    from lorafleet.worker.demo_assets import make_demo

    return make_demo(tmp_path_factory.mktemp("scheduler-demo") / "model", num_adapters=3)


@pytest.fixture(scope="session")
def offline(demo) -> Callable[..., list[tuple[int, ...]]]:
    """Greedy token ids from one in-process engine: the reference the runtime must reproduce."""
    from lorafleet.worker import Engine, SamplingParams

    engine = Engine.from_pretrained(demo.model_dir, max_batch_size=8)
    for name, path in demo.adapters.items():
        engine.add_adapter(name, path)

    def run(prompts: list[list[int]], adapters: list[str | None], max_new_tokens: list[int]):
        sampling = [
            SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in max_new_tokens
        ]
        return [o.token_ids for o in engine.generate(prompts, adapters=adapters, sampling=sampling)]

    return run


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    # "local": a Ray of the test's own, never a cluster `ray start` left on this (shared) machine.
    ray.init(
        address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def fleet_config(demo) -> Callable[..., object]:
    from lorafleet.scheduler.fleet_config import FleetConfig

    def make(**overrides):
        values = {
            "model_dir": str(demo.model_dir),
            "min_workers": 1,
            "max_workers": 1,
            "engine": {"max_batch_size": MAX_BATCH},
            "consolidation_interval_s": 60.0,
            "idle_release_s": 60.0,
        }
        values.update(overrides)
        return FleetConfig(**values)

    return make


@pytest.fixture
def run_async() -> Callable:
    def run(coro, timeout: float = 120.0):
        return asyncio.run(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture
def wait_for() -> Callable:
    """`await wait_for(predicate)`: poll until it holds; AssertionError after `timeout` seconds."""

    async def wait(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.01)

    return wait


@pytest.fixture
def register_all(demo) -> Callable:
    def register(fleet) -> list[str]:
        for name, path in demo.adapters.items():
            fleet.register_adapter(name, str(Path(path)), confined=False)
        return sorted(demo.adapters)

    return register
