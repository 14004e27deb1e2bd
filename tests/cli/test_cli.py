"""The `lorafleet` command: user errors give one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "generate", "status", "adapters", "bench", "demo", "make-demo", "selfcheck"):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--server", "127.0.0.1:1"],  # no prompt
        ["generate", "--prompt", "x", "--prompt-ids", "1"],  # both prompts
        ["generate", "--prompt-ids", "1,x"],
        ["bench", "--synthetic", "--popularity", "zipf"],
        ["serve", "--metrics-port", "abc"],
        ["adapters"],
    ],
)
def test_usage_errors_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve"], "model"),
        (["serve", "--model", "/no/such/model", "--port", "0"], "does not exist"),
        (["serve", "--config", "/no/such.yaml"], "does not exist"),
        (["serve", "--model", "/m", "--workers", "0"], "workers"),
        (["serve", "--model", "/m", "--adapter", "broken"], "NAME=DIR"),
    ],
)
def test_serve_config_errors_are_one_line(argv, needle, capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_unreachable_server_is_a_clear_error() -> None:
    port = _free_port()
    for argv in (
        ["generate", "--server", f"127.0.0.1:{port}", "--prompt", "hi", "--timeout", "2"],
        ["status", "--server", f"127.0.0.1:{port}", "--timeout", "2"],
        ["adapters", "list", "--server", f"127.0.0.1:{port}", "--timeout", "2"],
        ["bench", "--server", f"127.0.0.1:{port}", "--synthetic", "--connect-timeout", "1"],
    ):
        done = run(*argv)
        assert done.returncode == 1, (argv, done.stderr)
        assert "Traceback" not in done.stderr
        assert f"127.0.0.1:{port}" in done.stderr, done.stderr


def test_bad_server_address_is_a_clear_error(capsys) -> None:
    assert main(["status", "--server", "nowhere"]) == 1
    assert "HOST:PORT" in capsys.readouterr().err


def test_bench_missing_trace_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["bench", "--trace", str(tmp_path / "missing.csv"), "--connect-timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_make_demo_and_refusal_to_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["make-demo", str(out), "--num-adapters", "2"]) == 0
    assert (out / "config.json").is_file() and (out / "adapters" / "adapter-1").is_dir()
    # The chat template that makes /v1/chat/completions work on the demo, and it renders.
    from lorafleet.serving.chat_template import ChatTemplate

    template = ChatTemplate.from_dir(out)
    assert template is not None
    assert template.render([{"role": "user", "content": "hi"}]) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    assert main(["make-demo", str(out)]) == 1
    assert "overwrite" in capsys.readouterr().err


def test_selfcheck_passes_on_cpu(capsys) -> None:
    assert main(["selfcheck", "--device", "cpu"]) == 0
    assert "checks passed" in capsys.readouterr().out


def test_port_in_use_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err


def test_http_port_in_use_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", str(tmp_path), "--port", "0", "--metrics-port", "off"]
        assert main([*argv, "--http-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "HTTP" in err and "Traceback" not in err
