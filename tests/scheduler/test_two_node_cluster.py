"""Two `ray start` nodes on this machine (own ports and temp dirs, started by deploy/ray_cluster.sh),
a CPU worker on each; the second node is SIGKILLed mid-stream and its requests finish on the first
with the tokens of the offline engine. Only the processes this test started are stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

DRIVER = Path(__file__).with_name("two_node_driver.py")


@pytest.fixture
def cluster(ray_nodes) -> tuple[Any, Any, dict[str, str]]:
    """A head and a second node (conftest's RayNode), and the environment that joins them."""
    make_node, env = ray_nodes
    head, second = make_node("a"), make_node("b")
    head.script("head")
    second.script("worker", "127.0.0.1")
    return head, second, env


def test_killed_node_requests_finish_on_the_other_with_the_same_tokens(
    cluster: tuple[Any, Any, dict[str, str]], tmp_path: Path
) -> None:
    from lorafleet.worker.demo_assets import make_demo

    head, second, env = cluster
    model = tmp_path / "model"
    make_demo(model, num_adapters=1)
    address = head.address()
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
