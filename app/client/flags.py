"""The flags every command that talks to a server shares: how to authenticate and whom to trust.

The token comes from `--token-file FILE` or the LORAFLEET_TOKEN environment variable, never from a
flag, which `ps` and shell history would show to other users of the machine.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from lorafleet.serving.auth import TOKEN_ENV, read_token_file


def add_client_auth_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help=f"file holding the bearer token (default: the {TOKEN_ENV} environment variable)",
    )
    p.add_argument(
        "--tls-ca", metavar="FILE", default=None, help="PEM CA certificate of a TLS server (turns TLS on)"
    )
    p.add_argument(
        "--tls-client-cert", metavar="FILE", default=None, help="PEM client certificate for an mTLS server"
    )
    p.add_argument("--tls-client-key", metavar="FILE", default=None, help="PEM key of --tls-client-cert")


def client_token(args: argparse.Namespace) -> str | None:
    """--token-file wins over LORAFLEET_TOKEN; None when neither is given (auth off)."""
    path = getattr(args, "token_file", None)
    if path is not None:
        return read_token_file(path)
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of Client/AsyncClient from the parsed flags."""
    return {
        "token": client_token(args),
        "tls_ca": getattr(args, "tls_ca", None),
        "tls_client_cert": getattr(args, "tls_client_cert", None),
        "tls_client_key": getattr(args, "tls_client_key", None),
    }
