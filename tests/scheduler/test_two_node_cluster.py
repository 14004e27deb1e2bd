"""Two `ray start` nodes on this machine (own ports and temp dirs, started by deploy/ray_cluster.sh),
a CPU worker on each; the second node is SIGKILLed mid-stream and its requests finish on the first
with the tokens of the offline engine. Only the processes this test started are stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "ray_cluster.sh"
DRIVER = Path(__file__).with_name("two_node_driver.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> str:
    """Every fixed-default port of a Ray node, picked free, so two nodes (and other users' Ray) coexist."""
    flags = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port")
    flags += ("dashboard-agent-listen-port", "runtime-env-agent-port", "metrics-export-port")
    return " ".join(f"--{flag}={_free_port()}" for flag in flags)


class Node:
    def __init__(self, base: Path, name: str, env: dict[str, str]) -> None:
        self.env = {**env, "LORAFLEET_RAY_DIR": str(base / name), "NUM_CPUS": "1"}
        self.env["RAY_START_ARGS"] = _node_ports()

    def script(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=self.env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    def pids(self) -> list[int]:
        return [int(line.split()[0]) for line in self.script("pids").stdout.splitlines()]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Node, Node, dict[str, str]]]:
    base = Path(tempfile.mkdtemp(prefix="lf2n-", dir="/tmp"))  # Ray's socket paths must stay short
    home = base / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", HOME=str(home))
    env.update(RAY_DISABLE_USAGE_STATS="1", RAY_PORT=str(_free_port()))
    head, second = Node(base, "a", env), Node(base, "b", env)
    try:
        head.script("head")
        second.script("worker", "127.0.0.1")
        yield head, second, {**env, "RAY_AUTH_MODE": "token"}
    finally:
        for node in (second, head):
            subprocess.run(["bash", str(SCRIPT), "stop"], env=node.env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_killed_node_requests_finish_on_the_other_with_the_same_tokens(
    cluster: tuple[Node, Node, dict[str, str]], tmp_path: Path
) -> None:
    from lorafleet.worker.demo_assets import make_demo

    head, second, env = cluster
    model = tmp_path / "model"
    make_demo(model, num_adapters=1)
    address = (Path(head.env["LORAFLEET_RAY_DIR"]) / "ray_current_cluster").read_text().strip()
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), str(model), address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert driver.stdout is not None and driver.stdin is not None and driver.stderr is not None
        started = driver.stdout.readline()
        if started.strip() != "STARTED":
            driver.kill()
            pytest.fail(f"the driver did not start: {started}{driver.stderr.read()[-3000:]}")
        victims = second.pids()  # the second node's Ray, with the lorafleet worker it now hosts
        assert victims and not set(victims) & set(head.pids())
        driver.stdin.write("KILL " + " ".join(map(str, victims)) + "\n")
        driver.stdin.flush()
        out, err = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, err[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["killed_at"] is not None, "the kill never happened mid-stream"
    assert result["errors"] == {}, result["errors"]
    assert result["tokens"] == result["offline"], "greedy outputs changed by the node loss"
    assert result["worker_deaths"] >= 1 and result["resumed_after_fault"] >= 1
    assert any(0 < n < 160 for n in result["killed_at"].values()), "requests were not mid-stream"
    assert second.pids() == [], "the killed node left processes behind"
    assert head.pids(), "the first node must have survived"
