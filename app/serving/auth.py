"""Bearer tokens with two roles: the API keys file and the constant-time lookup of a token's role.

The file (`serve --api-keys-file`, or LORAFLEET_API_KEYS_FILE) holds one `ROLE TOKEN` per line;
blank lines and `#` comments are allowed. Tokens never come from a flag, where `ps` would show
them, and errors about the file name its path and line, never the token itself.

Clients may generate and list; admins may also register and unregister adapters. Which calls need
an admin is listed here once, for the gRPC interceptor and the HTTP middleware alike.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

API_KEYS_ENV = "LORAFLEET_API_KEYS_FILE"
TOKEN_ENV = "LORAFLEET_TOKEN"
MIN_TOKEN_CHARS = 16  # a short token can be guessed over the network; refuse it at startup

# The calls only an admin may make (they change what every tenant sees).
ADMIN_GRPC_METHODS = frozenset(
    {"/lorafleet.v1.LoraFleet/RegisterAdapter", "/lorafleet.v1.LoraFleet/UnregisterAdapter"}
)
ADMIN_HTTP_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


class Role(enum.Enum):
    CLIENT = "client"
    ADMIN = "admin"


class KeysFileError(ValueError):
    """The API keys file is missing, unreadable or malformed (the message never holds a token)."""


@dataclass(frozen=True)
class ApiKeys:
    """The accepted tokens and their roles."""

    entries: tuple[tuple[bytes, Role], ...]

    def role_of(self, token: str | None) -> Role | None:
        """The token's role, or None. Every entry is compared, in constant time each, so the time
        taken does not tell how much of a token matched or which entry it was."""
        if not token:
            return None
        given = token.encode("utf-8", "surrogateescape")
        found: Role | None = None
        for secret, role in self.entries:
            if hmac.compare_digest(given, secret) and found is None:
                found = role
        return found

    def role_of_header(self, value: str | None) -> Role | None:
        """The role of an `Authorization: Bearer <token>` value (scheme case-insensitive)."""
        token = bearer_token(value)
        return None if token is None else self.role_of(token)


def bearer_token(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def allowed(role: Role, admin_only: bool) -> bool:
    return role is Role.ADMIN or not admin_only


def parse_keys(lines: Iterable[str], source: str) -> ApiKeys:
    """Parse `ROLE TOKEN` lines; KeysFileError naming `source` and the line number."""
    entries: list[tuple[bytes, Role]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        parts = line.split()
        if len(parts) != 2:
            raise KeysFileError(f"{where}: expected `ROLE TOKEN` (two fields), got {len(parts)} field(s)")
        role_name, token = parts
        try:
            role = Role(role_name.lower())
        except ValueError:
            # The first field is the role, not a secret; still, a token pasted there must not leak.
            raise KeysFileError(f"{where}: the role must be 'client' or 'admin'") from None
        if len(token) < MIN_TOKEN_CHARS:
            raise KeysFileError(f"{where}: the token is shorter than {MIN_TOKEN_CHARS} characters")
        if not token.isascii() or not token.isprintable():
            raise KeysFileError(f"{where}: the token must be printable ASCII")
        secret = token.encode()
        if secret in seen:
            raise KeysFileError(f"{where}: this token is already listed on an earlier line")
        seen.add(secret)
        entries.append((secret, role))
    if not entries:
        raise KeysFileError(
            f"{source}: no `ROLE TOKEN` lines (auth on with no token would refuse every call)"
        )
    return ApiKeys(tuple(entries))


def load_keys(path: str | Path) -> ApiKeys:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysFileError(f"API keys file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeysFileError(f"API keys file {str(path)!r} cannot be read: {reason}") from None
    return parse_keys(text.splitlines(), repr(str(path)))


def read_token_file(path: str | Path) -> str:
    """The client's token: the file's first non-blank line (ValueError naming the file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"token file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"token file {str(path)!r} cannot be read: {reason}") from None
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ValueError(f"token file {str(path)!r} holds no token")
