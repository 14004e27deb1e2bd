"""`lorafleet serve --ray-address`: a cluster that is not there is a one-line error in bounded time.

Real processes and sockets on loopback: a closed port (refused at once) and a port that accepts
connections but never answers as Ray's GCS would (Ray itself would retry for minutes).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafleet.cli import main

pytest.importorskip("ray")
BOUND_S = 40.0  # the CLI's start-up (torch, Ray imports) plus the 3 s connect bound, with room


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray-address") / "demo"
    assert main(["make-demo", str(out), "--num-adapters", "1"]) == 0
    return out


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener accepts TCP connections (the backlog does) and never replies."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model_dir: Path, ray_address: str) -> tuple[subprocess.CompletedProcess, float]:
    args = ["serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "off", "--http-port", "off"]
    args += ["--ray-address", ray_address, "--ray-connect-timeout-s", "3"]
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=BOUND_S + 60,
        env=env,
    )
    return done, time.monotonic() - started


def _error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("lorafleet: error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_refused_address_fails_at_once(model_dir: Path) -> None:
    port = _closed_port()
    done, took = _serve(model_dir, f"127.0.0.1:{port}")
    assert done.returncode == 1
    line = _error_line(done)
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line
    assert took < BOUND_S


def test_silent_address_fails_after_the_connect_bound(model_dir: Path, silent_port: int) -> None:
    done, took = _serve(model_dir, f"127.0.0.1:{silent_port}")
    assert done.returncode == 1
    line = _error_line(done)
    assert f"could not join the Ray cluster at 127.0.0.1:{silent_port} within 3 s" in line
    assert "RAY_AUTH_MODE=token" in line  # the other common reason a join hangs or fails
    assert 3.0 <= took < BOUND_S


def test_malformed_address_is_a_usage_error(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["serve", "--model", str(model_dir), "--port", "0", "--metrics-port", "off", "--http-port", "off"]
    assert main([*argv, "--ray-address", "head-without-port"]) == 1
    assert "must be 'auto' or HOST:PORT" in capsys.readouterr().err
