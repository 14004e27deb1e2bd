"""deploy/ray_cluster.sh for real: a head in its own temp dir, stopped without touching anything else.

The machine may run other people's Ray clusters; the test proves selectivity with a decoy process
whose command line names a sibling directory, and never runs `ray stop`.
"""

from __future__ import annotations

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

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "ray_cluster.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Ray's socket paths must fit in 107 bytes, so its temp dir cannot live under pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="lfr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(base: Path, **extra: str) -> dict[str, str]:
    home = base / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    # The venv's `ray` and `lorafleet` first; a HOME of its own so the auth token is the test's.
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", HOME=str(home))
    env.update(RAY_DISABLE_USAGE_STATS="1", LORAFLEET_RAY_DIR=str(base / "ray"))
    return {**env, **extra}


def _script(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _pids(env: dict[str, str]) -> list[int]:
    done = _script(env, "pids")
    assert done.returncode == 0, done.stderr
    return [int(line.split()[0]) for line in done.stdout.splitlines()]


@pytest.fixture
def decoy(short_dir: Path) -> Iterator[subprocess.Popen]:
    """A process that is not ours but whose command line names a directory sharing our prefix."""
    sibling = short_dir / "ray-other" / "session_x"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(sibling)])
    yield proc
    proc.kill()
    proc.wait(10)


def test_head_records_its_processes_and_stop_ends_only_those(
    short_dir: Path, decoy: subprocess.Popen
) -> None:
    env = _env(short_dir, RAY_PORT=str(_free_port()), NUM_CPUS="1")
    started = _script(env, "head")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        token = short_dir / "home" / ".ray" / "auth_token"
        assert token.is_file() and token.stat().st_size > 0, "head must create the auth token it needs"
        recorded = [int(p) for p in (short_dir / "ray" / "lorafleet.pids").read_text().split()]
        ours = _pids(env)
        assert recorded and set(recorded) <= set(ours)
        assert decoy.pid not in ours and os.getpid() not in ours
        gcs = [p for p in ours if "gcs_server" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(gcs) == 1, "exactly this head's GCS"
    finally:
        stopped = _script(env, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert _pids(env) == []
    for pid in recorded:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"Ray process {pid} survived stop"
    assert decoy.poll() is None, "stop ended a process that was not its own"
    assert not (short_dir / "ray" / "lorafleet.pids").exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_with_nothing_running_is_a_no_op(short_dir: Path) -> None:
    done = _script(_env(short_dir), "stop")
    assert done.returncode == 0 and "no Ray processes" in done.stderr


def test_worker_without_a_token_says_where_to_get_one(short_dir: Path) -> None:
    done = _script(_env(short_dir), "worker", "127.0.0.1")
    assert done.returncode == 1
    assert "RAY_AUTH_MODE=token" in done.stderr and "auth_token" in done.stderr


def test_serve_without_a_head_here_is_a_clear_error(short_dir: Path) -> None:
    config = short_dir / "serve.yaml"
    config.write_text("model: /models/x\n")
    done = _script(_env(short_dir, RAY_AUTH_MODE="disabled"), "serve", str(config))
    assert done.returncode == 1 and "run" in done.stderr and "head" in done.stderr


def test_too_long_a_ray_dir_is_refused_before_ray_starts(short_dir: Path) -> None:
    env = _env(short_dir, LORAFLEET_RAY_DIR="/tmp/" + "d" * 60)
    done = _script(env, "head")
    assert done.returncode == 1 and "107-byte limit" in done.stderr


def test_usage_lists_the_commands(short_dir: Path) -> None:
    done = _script(_env(short_dir), "bogus")
    assert done.returncode == 2
    for command in ("head", "worker HEAD_IP", "serve CONFIG.yaml", "stop", "pids"):
        assert command in done.stderr
