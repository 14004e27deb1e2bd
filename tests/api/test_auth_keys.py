"""The API keys file, the client's token sources, and the warnings `serve` prints."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.config import ServeConfig
from lorafleet.serving.auth import KeysFileError, Role, bearer_token, load_keys, parse_keys, read_token_file
from lorafleet.serving.security_warnings import is_loopback, security_warnings

SECRET = "s3cret-value-nobody-may-see"


def test_roles_comments_and_blank_lines(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"# operators\n\nadmin   {SECRET}\n  client client-token-0123456789  \n")
    keys = load_keys(file)
    assert keys.role_of(SECRET) is Role.ADMIN
    assert keys.role_of("client-token-0123456789") is Role.CLIENT
    assert keys.role_of(SECRET[:-1]) is None
    assert keys.role_of(SECRET + "x") is None
    assert keys.role_of("") is None and keys.role_of(None) is None
    assert keys.role_of_header(f"Bearer {SECRET}") is Role.ADMIN
    assert keys.role_of_header(f"bearer {SECRET}") is Role.ADMIN
    assert keys.role_of_header(SECRET) is None
    assert bearer_token("Basic abc") is None


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (f"admin {SECRET} extra", 1, "two fields"),
        (f"# ok\nroot {SECRET}", 2, "'client' or 'admin'"),
        (f"{SECRET} admin", 1, "'client' or 'admin'"),
        (f"client {SECRET}\n\nadmin {SECRET}", 3, "already listed"),
        ("client tiny7", 1, "shorter than"),
        (f"client\n{SECRET}", 1, "two fields"),
        (f"admin {SECRET}é", 1, "printable ASCII"),
    ],
)
def test_bad_lines_name_the_file_and_line_but_never_the_token(
    tmp_path: Path, text: str, line: int, needle: str
) -> None:
    file = tmp_path / "keys.txt"
    file.write_text(text)
    with pytest.raises(KeysFileError) as error:
        load_keys(file)
    message = str(error.value)
    assert f"keys.txt' line {line}:" in message
    assert needle in message
    assert SECRET not in message and "tiny7" not in message


def test_empty_missing_and_unreadable_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(KeysFileError, match="no `ROLE TOKEN` lines"):
        load_keys(empty)
    with pytest.raises(KeysFileError, match="does not exist"):
        load_keys(tmp_path / "nope")
    with pytest.raises(KeysFileError, match="cannot be read"):
        load_keys(tmp_path)


def test_lookup_among_many_entries() -> None:
    # Any entry can match; a prefix or an extension of a token is no token.
    keys = parse_keys([f"client {c * 20}" for c in "abcdef"] + [f"admin {SECRET}"], "test")
    assert [keys.role_of(c * 20) for c in "af"] == [Role.CLIENT, Role.CLIENT]
    assert keys.role_of("a" * 19) is None
    assert keys.role_of("a" * 21) is None


def test_token_file(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("\n# mine\n  tok-en  \n")
    assert read_token_file(file) == "tok-en"
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_token_file(tmp_path / "blank")
    with pytest.raises(ValueError, match="does not exist"):
        read_token_file(tmp_path / "nope")


def test_loopback_detection() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.com"))


def test_warnings_for_open_network_settings() -> None:
    assert security_warnings(ServeConfig(model="/m")) == []
    open_host = security_warnings(ServeConfig(model="/m", host="0.0.0.0"))
    assert len(open_host) == 1 and "WARNING" in open_host[0] and "--api-keys-file" in open_host[0]
    keyed = ServeConfig(model="/m", host="0.0.0.0", api_keys_file="/k")
    assert [w for w in security_warnings(keyed) if "clear text" not in w] == []
    with_tls = ServeConfig(model="/m", host="0.0.0.0", api_keys_file="/k", tls_cert="/c", tls_key="/k")
    assert security_warnings(with_tls) == []
    metrics = security_warnings(ServeConfig(model="/m", metrics_host="0.0.0.0"))
    assert len(metrics) == 1 and "/metrics" in metrics[0]
    assert security_warnings(ServeConfig(model="/m", metrics_host="0.0.0.0", metrics_port=None)) == []


def test_metrics_stay_on_loopback_by_default() -> None:
    assert ServeConfig(model="/m", host="0.0.0.0").metrics_host == "127.0.0.1"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"tls_cert": "/c"}, "tls_cert is set but tls_key is not"),
        ({"tls_key": "/k"}, "tls_key is set but tls_cert is not"),
        ({"tls_client_ca": "/ca"}, "needs tls_cert and tls_key"),
        ({"api_keys_file": ""}, "api_keys_file"),
        ({"metrics_host": ""}, "metrics_host"),
    ],
)
def test_config_checks_security_settings(values: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServeConfig(model="/m", **values)


def test_warning_for_a_keys_file_others_can_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"admin {SECRET}\n")
    keys.chmod(0o644)
    config = ServeConfig(model="/m", api_keys_file=str(keys))
    warnings = security_warnings(config)
    assert len(warnings) == 1 and "chmod 600" in warnings[0] and "644" in warnings[0]
    assert SECRET not in warnings[0]
    keys.chmod(0o600)
    assert security_warnings(config) == []
