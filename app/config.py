"""`lorafleet serve` configuration: one frozen dataclass, loaded from YAML, every field a CLI flag.

Precedence: dataclass defaults < YAML file (`--config FILE`) < command-line flags. YAML keys are
the field names (`metrics_port`), flags the same names with dashes (`--metrics-port`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The fleet's own choices and number check: one definition, so serve flags and FleetConfig agree.
from lorafleet.scheduler.fleet_config import (
    DEVICES,
    DTYPES,
    POLICIES,
    check_batch_target,
    check_int,
    check_positive,
)
from lorafleet.serving.tls import check_server_tls


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """'NAME=DIR' -> (NAME, DIR); ValueError naming the spec when it is malformed."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"adapter spec {spec!r} must look like NAME=DIR")
    return name.strip(), path.strip()


def parse_engine_option(spec: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (KEY, VALUE parsed as a YAML scalar, so numbers and booleans keep their type)."""
    key, sep, raw = spec.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"engine option {spec!r} must look like KEY=VALUE")
    return key.strip(), yaml.safe_load(raw)


def _check_port(name: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"{name} must be an integer port in 0..65535 (0 = any free port), got {port!r}")


@dataclass(frozen=True)
class ServeConfig:
    model: str
    adapters: tuple[tuple[str, str], ...] = ()  # (name, dir) pairs; YAML: a name -> dir mapping
    adapters_dir: str | None = None  # every sub-folder holding adapter_config.json is registered
    # Folders API registrations must lie in (--adapter-root, repeatable); none given = adapters_dir
    # and the folders holding the --adapter directories.
    adapter_roots: tuple[str, ...] = ()
    workers: int = 1  # workers started at launch (the fleet's minimum)
    max_workers: int | None = None  # None = workers
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"  # gRPC and HTTP; beyond loopback without api_keys_file -> a loud warning
    port: int = 50051
    metrics_port: int | None = 9400  # None = no metrics endpoint
    # /metrics has its own address, so `--host 0.0.0.0` does not publish it by itself.
    metrics_host: str = "127.0.0.1"
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API; None = off
    ray_address: str | None = None  # None = always a new local Ray; "auto" or HOST:PORT joins one
    ray_connect_timeout_s: float = 60.0  # give up starting / joining Ray after this, with an error
    ray_lost_timeout_s: float = 15.0  # Ray's GCS silent this long: fail requests UNAVAILABLE, exit 1
    policy: str = "packing"
    pack_batch_target: int | None = None  # placement fills a worker to this batch; None = engine limit
    max_queue: int = 256  # requests admitted but not yet placed; beyond it -> RESOURCE_EXHAUSTED
    consolidation_interval_s: float = 2.0
    idle_release_s: float = 30.0
    drain_timeout_s: float = 30.0  # Ctrl-C waits this long for running requests
    metrics_top_adapters: int = 20  # per-adapter metric series kept; the rest sum into "other"
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineConfig fields
    # `ROLE TOKEN` lines (auth.py); None = no authentication. A path, never a token: flags show in `ps`.
    api_keys_file: str | None = None
    tls_cert: str | None = None  # PEM certificate (chain) of the gRPC server; needs tls_key
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mTLS: clients must present a certificate signed by this CA

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must name the base model folder")
        adapters = self.adapters
        if isinstance(adapters, Mapping):
            adapters = tuple(adapters.items())
        pairs = tuple(
            parse_adapter_spec(a) if isinstance(a, str) else (str(a[0]), str(a[1])) for a in adapters
        )
        names = [name for name, _ in pairs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"adapter names given twice: {', '.join(duplicates)}")
        object.__setattr__(self, "adapters", pairs)
        roots = (self.adapter_roots,) if isinstance(self.adapter_roots, str) else tuple(self.adapter_roots)
        if not all(isinstance(r, str) and r for r in roots):
            raise ValueError(f"adapter_roots must be folder paths, got {self.adapter_roots!r}")
        object.__setattr__(self, "adapter_roots", roots)
        check_int("workers", self.workers, 1)
        if self.max_workers is None:
            object.__setattr__(self, "max_workers", self.workers)
        elif (
            not isinstance(self.max_workers, int)
            or isinstance(self.max_workers, bool)
            or self.max_workers < self.workers
        ):
            raise ValueError(
                f"max_workers must be an integer >= workers ({self.workers}), got {self.max_workers!r}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must be a non-empty address to listen on")
        _check_port("port", self.port)
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            raise ValueError("metrics_host must be a non-empty address to listen on")
        for name in ("api_keys_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a file path, got {value!r}")
        check_server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)
        if self.metrics_port is not None:
            _check_port("metrics_port", self.metrics_port)
        if self.http_port is not None:
            _check_port("http_port", self.http_port)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not isinstance(self.engine, Mapping) or not all(isinstance(k, str) for k in self.engine):
            raise ValueError(f"engine must map EngineConfig field names to values, got {self.engine!r}")
        check_batch_target("pack_batch_target", self.pack_batch_target, self.engine)
        check_int("max_queue", self.max_queue, 1)
        check_positive("ray_connect_timeout_s", self.ray_connect_timeout_s)
        check_positive("ray_lost_timeout_s", self.ray_lost_timeout_s)
        check_positive("consolidation_interval_s", self.consolidation_interval_s)
        check_positive("idle_release_s", self.idle_release_s, allow_zero=True)
        check_positive("drain_timeout_s", self.drain_timeout_s, allow_zero=True)
        check_int("metrics_top_adapters", self.metrics_top_adapters, 0)
        object.__setattr__(self, "engine", dict(self.engine))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> ServeConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(cls.field_names())}"
            )
        if "model" not in values or values["model"] in (None, ""):
            raise ValueError(f"{source}: the base model folder is missing (YAML `model:` or --model)")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ServeConfig:
        """YAML file (optional) overlaid with overrides; None-valued overrides mean "flag not given"."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_yaml_mapping(path))
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key == "engine" and isinstance(values.get("engine"), Mapping):
                value = {**values["engine"], **value}
            values[key] = value
        return cls.from_dict(values, source=str(path) if path is not None else "flags")

    def to_dict(self) -> dict[str, Any]:
        """YAML-ready: what `from_dict` reads back to an equal config."""
        out = dataclasses.asdict(self)
        out["adapters"] = {name: path for name, path in self.adapters}
        out["engine"] = dict(self.engine)
        return out

    def effective_adapter_roots(self) -> tuple[str, ...]:
        """The folders API registrations are confined to (see ``adapter_roots``)."""
        if self.adapter_roots:
            return self.adapter_roots
        roots = [self.adapters_dir] if self.adapters_dir is not None else []
        roots += [str(Path(path).expanduser().resolve().parent) for _, path in self.adapters]
        return tuple(dict.fromkeys(roots))

    def adapter_sources(self) -> list[tuple[str, str]]:
        """Every adapter to register at start: explicit ones, then adapters_dir's sub-folders by name.

        ValueError (naming the path) when a folder is missing or a name is given twice.
        """
        found = list(self.adapters)
        if self.adapters_dir is not None:
            root = Path(self.adapters_dir)
            if not root.is_dir():
                raise ValueError(f"adapters_dir {self.adapters_dir!r} is not a folder")
            for sub in sorted(root.iterdir()):
                if (sub / "adapter_config.json").is_file():
                    found.append((sub.name, str(sub)))
        names = [name for name, _ in found]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter names found twice (--adapter and --adapters-dir): {', '.join(twice)}")
        return found


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}"
        )
    return data
