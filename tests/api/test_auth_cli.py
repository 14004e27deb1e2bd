"""The CLI with auth: the token from --token-file or LORAFLEET_TOKEN (no token flag exists), admin
commands refused for a client token, and `serve`'s keys file and warnings checked before Ray."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from lorafleet.cli import build_parser, main, serve_config


def _token_file(tmp_path: Path, token: str) -> str:
    file = tmp_path / "token"
    file.write_text(token + "\n")
    return str(file)


def test_token_file_authenticates(auth_server, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LORAFLEET_TOKEN", raising=False)
    address = auth_server["api"].address
    token = _token_file(tmp_path, auth_server["client"])
    assert main(["adapters", "list", "--server", address, "--token-file", token, "--json"]) == 0
    assert "alice" in capsys.readouterr().out
    assert main(["status", "--server", address, "--token-file", token]) == 0
    assert main(["generate", "--server", address, "--token-file", token, "--prompt-ids", "1,2"]) == 0


def test_environment_token_authenticates(auth_server, capsys, monkeypatch) -> None:
    address = auth_server["api"].address
    monkeypatch.setenv("LORAFLEET_TOKEN", auth_server["client"])
    assert main(["status", "--server", address, "--json"]) == 0
    monkeypatch.setenv("LORAFLEET_TOKEN", auth_server["admin"])
    assert main(["adapters", "register", "--server", address, "dave", "/adapters/dave"]) == 0
    assert main(["adapters", "unregister", "--server", address, "dave"]) == 0


def test_token_file_wins_over_the_environment(auth_server, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LORAFLEET_TOKEN", "not-a-valid-token-at-all")
    token = _token_file(tmp_path, auth_server["client"])
    assert main(["status", "--server", auth_server["api"].address, "--token-file", token]) == 0


def test_missing_wrong_and_client_tokens_are_refused(
    auth_server, tmp_path: Path, capsys, monkeypatch
) -> None:
    address = auth_server["api"].address
    monkeypatch.delenv("LORAFLEET_TOKEN", raising=False)
    assert main(["status", "--server", address]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("LORAFLEET_TOKEN", auth_server["client"])
    assert main(["adapters", "unregister", "--server", address, "alice"]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and auth_server["client"] not in err
    assert "alice" in auth_server["fleet"].adapters
    assert main(["status", "--server", address, "--token-file", str(tmp_path / "nope")]) == 1
    assert "token file" in capsys.readouterr().err


def test_no_command_takes_a_token_flag() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    parsers = list(sub.choices.values())
    flags: set[str] = set()
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            flags.update(action.option_strings)
            if action.choices and isinstance(action.choices, dict):
                parsers.extend(action.choices.values())
    assert "--token-file" in flags and "--tls-ca" in flags and "--api-keys-file" in flags
    assert not {f for f in flags if f in ("--token", "--api-key", "--api-keys")}


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_serve_reads_the_keys_file_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("LORAFLEET_API_KEYS_FILE", "/env/keys")
    assert serve_config(_serve_args("--model", "/m")).api_keys_file == "/env/keys"
    assert serve_config(_serve_args("--model", "/m", "--api-keys-file", "/flag")).api_keys_file == "/flag"
    monkeypatch.delenv("LORAFLEET_API_KEYS_FILE")
    assert serve_config(_serve_args("--model", "/m")).api_keys_file is None


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--api-keys-file", "KEYS"], "line 2"),
        (["--api-keys-file", "/no/such/keys"], "does not exist"),
        (["--tls-cert", "/no/cert.pem"], "tls_key is not"),
        (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], "does not exist"),
    ],
)
def test_serve_security_errors_are_one_line(tmp_path: Path, capsys, extra, needle) -> None:
    (tmp_path / "config.json").write_text("{}")
    keys = tmp_path / "keys"
    keys.write_text("admin admin-token-0123456789\nowner secret-token-9876543210\n")
    argv = [
        "serve",
        "--model",
        str(tmp_path),
        "--port",
        "0",
        *[str(keys) if a == "KEYS" else a for a in extra],
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert "secret-token" not in err and "admin-token" not in err


def test_serve_warns_on_an_open_host(tmp_path: Path, capsys) -> None:
    # A taken port stops serve right after the warnings, before Ray starts.
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(tmp_path), "--host", "0.0.0.0", "--port", port]) == 1
    err = capsys.readouterr().err
    assert "WARNING: listening on 0.0.0.0 without --api-keys-file" in err
    assert "cannot listen" in err


def test_serve_is_quiet_on_loopback(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", str(tmp_path), "--port", port]) == 1
    assert "WARNING" not in capsys.readouterr().err


BENCH = ["--synthetic", "--popularity", "distinct", "--rate", "50", "--duration", "1", "--max-requests", "4"]
BENCH += ["--prompt-len", "2", "--output-len", "2", "--no-progress", "--json"]


def test_bench_with_tokens(auth_server, capsys, monkeypatch) -> None:
    address = auth_server["api"].address
    monkeypatch.setenv("LORAFLEET_TOKEN", auth_server["client"])
    # distinct adapters need aliases, which are registrations: a client token gets a clear hint
    assert main(["bench", "--server", address, *BENCH]) == 1
    assert "needs an admin token" in capsys.readouterr().err
    assert main(["bench", "--server", address, *BENCH, "--aliases", "0"]) == 0
    assert '"requests": 4' in capsys.readouterr().out
    monkeypatch.setenv("LORAFLEET_TOKEN", auth_server["admin"])
    # over HTTP the token goes as a header; status and aliases still use gRPC
    assert main(["bench", "--server", address, "--http", auth_server["base"], *BENCH]) == 0
    out = capsys.readouterr().out
    assert '"requests": 4' in out and "unauthenticated" not in out
