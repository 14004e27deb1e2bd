"""The loud warnings `lorafleet serve` prints when its settings leave an API open to the network."""

from __future__ import annotations

import ipaddress
import os
import stat

from lorafleet.config import ServeConfig

_BANNER = "!" * 78


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; a wildcard (0.0.0.0, ::) or a name is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: assume it is reachable


def security_warnings(config: ServeConfig) -> list[str]:
    """One block of text per problem; empty when the configuration is closed or loopback-only."""
    out: list[str] = []
    if not is_loopback(config.host) and config.api_keys_file is None:
        out.append(
            f"{_BANNER}\nlorafleet: WARNING: listening on {config.host} without --api-keys-file: anyone who "
            "can reach\nthe gRPC and HTTP ports may generate, and register or unregister any tenant's "
            f"adapters.\nSee docs/security.md.\n{_BANNER}"
        )
    if (
        config.metrics_port is not None
        and not is_loopback(config.metrics_host)
        and config.api_keys_file is None
    ):
        out.append(
            f"lorafleet: WARNING: /metrics is served on {config.metrics_host} without --api-keys-file: "
            "it names adapters and load to anyone who can reach it."
        )
    if not is_loopback(config.host) and config.api_keys_file is not None and config.tls_cert is None:
        out.append(
            "lorafleet: WARNING: tokens cross the network in clear text on gRPC without --tls-cert "
            "(and always on HTTP: put a TLS proxy in front of it)."
        )
    if config.api_keys_file is not None:
        out.extend(_keys_file_warnings(config.api_keys_file))
    return out


def _keys_file_warnings(path: str) -> list[str]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []  # loading the file reports it
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [
            f"lorafleet: WARNING: the API keys file {path!r} is open to other users "
            f"(mode {stat.S_IMODE(mode):o}); `chmod 600` it."
        ]
    return []
