"""TLS credentials for gRPC, from PEM files: the server's (optionally requiring client certificates,
mTLS) and a client's. Each problem is a ValueError naming the setting and the file, raised before
anything starts listening."""

from __future__ import annotations

from pathlib import Path

import grpc


def read_pem(setting: str, path: str | Path) -> bytes:
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{setting} file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{setting} file {str(path)!r} is a folder, not a PEM file") from None
    except OSError as exc:
        raise ValueError(f"{setting} file {str(path)!r} cannot be read: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{setting} file {str(path)!r} is not PEM (no -----BEGIN line)")
    return data


def check_server_tls(cert: str | None, key: str | None, client_ca: str | None) -> None:
    """The combination rules alone (no file access), for config validation."""
    if (cert is None) != (key is None):
        given, missing = ("tls_cert", "tls_key") if cert is not None else ("tls_key", "tls_cert")
        raise ValueError(f"{given} is set but {missing} is not: TLS needs both the certificate and its key")
    if client_ca is not None and cert is None:
        raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key too")


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None
) -> grpc.ServerCredentials | None:
    """None without a certificate (plain gRPC); with `client_ca`, clients must present a
    certificate signed by it."""
    check_server_tls(cert, key, client_ca)
    if cert is None or key is None:
        return None
    pair = (read_pem("tls_key", key), read_pem("tls_cert", cert))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    roots = read_pem("tls_client_ca", client_ca)
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=True)


def channel_credentials(
    ca: str | None, client_cert: str | None = None, client_key: str | None = None
) -> grpc.ChannelCredentials:
    """Trust `ca` (None: the system's roots); a client certificate and key for mTLS servers."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs its key too (and the other way round)")
    roots = read_pem("tls_ca", ca) if ca is not None else None
    chain = read_pem("tls_client_cert", client_cert) if client_cert is not None else None
    private = read_pem("tls_client_key", client_key) if client_key is not None else None
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private, certificate_chain=chain)
