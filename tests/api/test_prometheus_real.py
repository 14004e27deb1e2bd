"""A real Prometheus scrapes a real `lorafleet serve` (CPU demo model) with deploy/prometheus.yml,
and every query of the Grafana dashboard returns data through Prometheus's HTTP API.

Skipped when no `prometheus` binary is installed (`.ci/run` installs Debian's package). Everything
listens on 127.0.0.1 ports picked free at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.client.grpc_client import Client

pytestmark = pytest.mark.slow
pytest.importorskip("ray")
PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    pytest.skip("no prometheus binary (apt-get install prometheus)", allow_module_level=True)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRAPE_INTERVAL_S = 1  # the shipped 5 s would only make the test slower


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read().decode())


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`lorafleet serve` on the demo model with 1 CPU worker: its gRPC address and metrics port."""
    from lorafleet.worker.demo_assets import make_demo

    model = tmp_path_factory.mktemp("prom-model")
    make_demo(model, num_adapters=3)
    port, metrics_port = _free_port(), _free_port()
    args = ["--model", str(model), "--adapters-dir", str(model / "adapters"), "--workers", "1"]
    args += ["--port", str(port), "--metrics-port", str(metrics_port), "--drain-timeout-s", "5"]
    args += ["--http-port", "off"]
    log = (tmp_path_factory.mktemp("prom-logs") / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.cli", "serve", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"},
    )
    address = f"127.0.0.1:{port}"
    try:
        with Client(address, timeout=30) as client:
            client.wait_ready(180)
            _wait(lambda: client.status().workers_in("active") >= 1, 120, "a worker")
        yield {"address": address, "metrics_port": metrics_port}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def prometheus(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on deploy/prometheus.yml, its target and interval set to this test's; its URL."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S}s"
    static = config["scrape_configs"][0]["static_configs"][0]
    static["targets"] = [f"127.0.0.1:{served['metrics_port']}"]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{_free_port()}"
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address={web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{web}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200, 60, "prometheus")
        yield url
    finally:
        _stop(proc, signal.SIGTERM, 20)
        log.close()


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    reply = _get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "lorafleet-dashboard.json").read_text())
    return [(panel["title"], t["expr"]) for panel in dashboard["panels"] for t in panel["targets"]]


def test_shipped_scrape_config_is_valid_for_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool")
    done = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_returns_data(served: dict[str, Any], prometheus: str) -> None:
    def target_up() -> bool:
        targets = _get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        return any(t["labels"].get("job") == "lorafleet" and t["health"] == "up" for t in targets)

    _wait(target_up, 30, "prometheus to scrape lorafleet")
    # Traffic across adapters (loads, per-adapter series, latency histograms) while Prometheus
    # scrapes, so that rate() windows hold several samples of moving counters.
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    end = time.monotonic() + 8
    i = 0
    with Client(served["address"], timeout=60) as client:
        while time.monotonic() < end:
            adapter = [None, "adapter-0", "adapter-1", "adapter-2"][i % 4]
            client.generate([5, 17, i % 50 + 1], adapter=adapter, sampling=greedy)
            i += 1
    assert i >= 4, "too little traffic to judge the dashboard"
    time.sleep(3 * SCRAPE_INTERVAL_S)  # the last requests' counters reach Prometheus

    empty = [f"{title}: {expr}" for title, expr in _dashboard_queries() if not _query(prometheus, expr)]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    tokens = _query(prometheus, "sum(rate(lorafleet_generated_tokens_total[1m]))")
    assert float(tokens[0]["value"][1]) > 0, "the throughput panel should show the traffic"
    ok = _query(prometheus, 'lorafleet_requests_total{status="ok"}')
    assert float(ok[0]["value"][1]) == i
