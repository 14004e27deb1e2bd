"""Fixtures for the runtime tests: the tiny demo model, its offline greedy outputs, a local Ray,
and private `ray start` nodes.

Each runtime test file gets one Ray session (module scope); workers are CPU actors with num_cpus=0
so three fit on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MAX_BATCH = 2
RAY_CLUSTER_SH = Path(__file__).resolve().parents[2] / "deploy" / "ray_cluster.sh"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> str:
    """Every fixed-default port of a Ray node, picked free, so two nodes (and other users' Ray) coexist."""
    flags = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port")
    flags += ("dashboard-agent-listen-port", "runtime-env-agent-port", "metrics-export-port")
    return " ".join(f"--{flag}={free_port()}" for flag in flags)


class RayNode:
    """One `ray start` node on this machine, through deploy/ray_cluster.sh (own temp dir and ports)."""

    def __init__(self, base: Path, name: str, env: dict[str, str]) -> None:
        self.env = {**env, "LORAFLEET_RAY_DIR": str(base / name), "NUM_CPUS": "1"}
        self.env["RAY_START_ARGS"] = _node_ports()

    def script(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", str(RAY_CLUSTER_SH), *args], capture_output=True, text=True, env=self.env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def processes(self) -> dict[int, str]:
        """pid -> command line (its first 120 characters) of this node's Ray processes."""
        lines = self.script("pids").stdout.splitlines()
        return {int(line.split()[0]): line.partition(" ")[2] for line in lines}

    def pids(self) -> list[int]:
        return sorted(self.processes())

    def address(self) -> str:
        """The head's GCS address as `ray start` recorded it (a head node only)."""
        return (Path(self.env["LORAFLEET_RAY_DIR"]) / "ray_current_cluster").read_text().strip()

    def stop(self) -> None:
        subprocess.run(["bash", str(RAY_CLUSTER_SH), "stop"], env=self.env, capture_output=True, timeout=120)


@pytest.fixture
def ray_nodes() -> Iterator[tuple[Callable[[str], RayNode], dict[str, str]]]:
    """(make_node(name), env): nodes of a private cluster (token auth on, its own HOME and GCS port);
    `env` is what a process joining it needs. Only the processes of these nodes are stopped."""
    base = Path(tempfile.mkdtemp(prefix="lf2n-", dir="/tmp"))  # Ray's socket paths must stay short
    home = base / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", HOME=str(home))
    env.update(RAY_DISABLE_USAGE_STATS="1", RAY_PORT=str(free_port()))
    made: list[RayNode] = []

    def make(name: str) -> RayNode:
        made.append(RayNode(base, name, env))
        return made[-1]

    try:
        yield make, {**env, "RAY_AUTH_MODE": "token"}
    finally:
        for node in reversed(made):
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


class Collector:
    """Consumes one stream, checking that tokens only grow and nothing follows the final delta."""

    def __init__(self, fleet, request) -> None:
        self.tokens: list[int] = []
        self.done = False
        self.task = asyncio.ensure_future(self._run(fleet, request))

    async def _run(self, fleet, request) -> None:
        async for delta in fleet.generate(request):
            assert not self.done
            self.tokens.extend(delta.new_token_ids)
            self.done = delta.finish_reason is not None
        assert self.done


@pytest.fixture
def collector() -> type[Collector]:
    """`collector(fleet, request)` starts consuming the request's stream (see `Collector`)."""
    return Collector
