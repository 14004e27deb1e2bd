"""gRPC over TLS and mTLS with certificates made in the test (the `openssl` binary; skipped
without it): a round trip, a plain client refused, and mTLS refusing a client without a certificate."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from lorafleet.client.grpc_client import ApiError, Client
from lorafleet.serving.api_types import ModelView
from lorafleet.serving.tls import channel_credentials, read_pem, server_credentials

from .conftest import MAX_CONTEXT, VOCAB, FakeFleet, LoopThread, fake_encode

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(folder: Path, name: str, extensions: str) -> None:
    """A key and certificate `name`, signed by the CA in `folder`."""
    (folder / f"{name}.ext").write_text(extensions)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=lorafleet-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        cwd=folder,
    )  # fmt: skip
    _leaf(folder, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(folder, "client", "extendedKeyUsage=clientAuth\n")
    return folder


def _serve(certs: Path, client_ca: bool) -> Iterator[tuple[Any, LoopThread]]:
    from lorafleet.serving.serve import start_api

    lt = LoopThread()
    tls = server_credentials(
        str(certs / "server.pem"), str(certs / "server.key"), str(certs / "ca.pem") if client_ca else None
    )
    model = ModelView(name="fake", vocab_size=VOCAB, max_context_tokens=MAX_CONTEXT)
    api = lt.run(start_api(FakeFleet(), model=model, encode=fake_encode, port=0, tls=tls))
    yield api, lt
    lt.run(api.stop(grace_s=0.1))
    lt.close()


@pytest.fixture
def tls_server(certs: Path) -> Iterator[tuple[Any, LoopThread]]:
    yield from _serve(certs, client_ca=False)


@pytest.fixture
def mtls_server(certs: Path) -> Iterator[tuple[Any, LoopThread]]:
    yield from _serve(certs, client_ca=True)


def test_tls_round_trip(tls_server, certs: Path) -> None:
    api, _ = tls_server
    with Client(api.address, timeout=10, tls_ca=str(certs / "ca.pem")) as client:
        result = client.generate([5, 6], adapter="alice", sampling={"max_new_tokens": 4})
    assert result.usage.generated_tokens == 4


def test_plain_client_cannot_talk_to_a_tls_server(tls_server) -> None:
    api, _ = tls_server
    with Client(api.address, timeout=3) as client, pytest.raises(ApiError) as refused:
        client.status()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(mtls_server, certs: Path) -> None:
    api, _ = mtls_server
    ca = str(certs / "ca.pem")
    with Client(api.address, timeout=3, tls_ca=ca) as client, pytest.raises(ApiError) as refused:
        client.status()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    with Client(
        api.address,
        timeout=10,
        tls_ca=ca,
        tls_client_cert=str(certs / "client.pem"),
        tls_client_key=str(certs / "client.key"),
    ) as client:
        assert client.status().model.vocab_size == VOCAB


def test_clear_errors_for_tls_files(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert is set but tls_key is not"):
        server_credentials(str(certs / "server.pem"), None, None)
    with pytest.raises(ValueError, match=r"tls_key file .*nope.* does not exist"):
        server_credentials(str(certs / "server.pem"), str(tmp_path / "nope"), None)
    with pytest.raises(ValueError, match="is a folder"):
        read_pem("tls_cert", tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"tls_client_ca file .*junk.pem.* is not PEM"):
        server_credentials(str(certs / "server.pem"), str(certs / "server.key"), str(tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="needs its key"):
        channel_credentials(str(certs / "ca.pem"), client_cert=str(certs / "client.pem"))


def test_cli_over_tls_and_mtls(mtls_server, certs: Path, capsys, monkeypatch) -> None:
    from lorafleet.cli import main

    monkeypatch.delenv("LORAFLEET_TOKEN", raising=False)
    api, _ = mtls_server
    base = ["status", "--server", api.address, "--timeout", "3"]
    client = ["--tls-client-cert", str(certs / "client.pem"), "--tls-client-key", str(certs / "client.key")]
    assert main([*base, "--tls-ca", str(certs / "ca.pem"), *client, "--json"]) == 0
    assert '"vocab_size": 384' in capsys.readouterr().out
    assert main([*base, "--tls-ca", str(certs / "ca.pem")]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(base) == 1
    assert "pass --tls-ca" in capsys.readouterr().err
