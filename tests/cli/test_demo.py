"""`lorafleet demo` runs the whole system (local Ray, 3 CPU workers, gRPC, a workload) and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


def test_demo_exits_zero_and_prints_its_summary(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    cmd = [sys.executable, "-m", "lorafleet.cli", "demo", "--cache-dir", str(tmp_path / "cache")]
    cmd += ["--phase-s", "2", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for needle in (
        "completed",
        "tokens/s",
        "TTFT p50 / p90 / p99",
        "TPOT p50 / p90 / p99",
        "workers busy over time",
        "migrations",
        "total demo time",
    ):
        assert needle in out, out
    requests_line = next(line for line in out.splitlines() if line.startswith("requests "))
    done_count, total = requests_line.split()[1].split("/")
    assert done_count == total and int(total) > 0
    assert "[demo] shutting down" in done.stderr
    assert (tmp_path / "cache" / "config.json").is_file()  # the assets stay cached for the next run
