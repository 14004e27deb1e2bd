"""FleetConfig: everything `Fleet.start` needs, frozen and validated on construction.

Loaded from YAML by the application (one key per CLI flag); `from_mapping` refuses unknown keys so a
typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("packing", "round_robin", "least_loaded", "random")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_batch_target(name: str, value: int | None, engine: Mapping[str, Any]) -> None:
    """None, or an integer >= 1 and, when the engine's batch limit is given, not above it (a target
    the engine can never reach would silently mean "off")."""
    if value is None:
        return
    check_int(name, value, 1)
    limit = engine.get("max_batch_size") if isinstance(engine, Mapping) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and value > limit:
        raise ValueError(f"{name} ({value}) must be <= the engine's max_batch_size ({limit})")


@dataclass(frozen=True)
class FleetConfig:
    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    min_workers: int = 1
    max_workers: int = 1
    policy: str = "packing"
    # Placement fills a worker only to this batch (the engine may run more: the headroom takes the
    # overflow while the fleet grows); None = the engine's limit. See policy.PlacementPolicy.
    pack_batch_target: int | None = None
    max_queue: int = 1024
    consolidation_interval_s: float = 2.0
    idle_release_s: float = 30.0
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineConfig keyword arguments
    ray_address: str | None = None  # None: start a local Ray; "auto" or an address: join a cluster
    # Folders that adapters registered through the API must lie in (symlinks resolved); none = the
    # API may register nothing. Adapters the operator passes at start-up are not confined.
    adapter_roots: tuple[str, ...] = ()
    ray_connect_timeout_s: float = 60.0  # starting or joining Ray fails with a clear error after this
    # Ray's GCS unreachable this long = the cluster is lost: requests fail UNAVAILABLE and serve exits
    # (below Ray's own gcs_rpc_server_reconnect_timeout_s, 60 s, after which Ray ends the process).
    ray_lost_timeout_s: float = 15.0
    # --- finer settings (defaults suit both the CPU demo and a GPU fleet) ---
    seed: int = 0  # the "random" baseline's generator
    worker_num_cpus: float = 0.0  # Ray CPUs reserved per worker (GPU workers always ask num_gpus=1)
    worker_start_timeout_s: float = 600.0  # a worker not ready by then counts as a failed start
    max_start_attempts: int = 5  # consecutive failed starts before the fleet stops retrying
    start_backoff_s: float = 1.0  # first retry delay; doubles per consecutive failure (max 60 s)
    max_migrations_per_pass: int = 32
    min_remaining_tokens: int = 4  # sequences this close to done are not worth migrating

    def __post_init__(self) -> None:
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ValueError("model_dir must be a non-empty path")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_int("min_workers", self.min_workers, 1)
        check_int("max_workers", self.max_workers, 1)
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        check_batch_target("pack_batch_target", self.pack_batch_target, self.engine)
        check_int("max_queue", self.max_queue, 1)
        check_positive("consolidation_interval_s", self.consolidation_interval_s)
        check_positive("idle_release_s", self.idle_release_s, allow_zero=True)
        if not isinstance(self.engine, Mapping) or not all(isinstance(k, str) for k in self.engine):
            raise ValueError(f"engine must be a mapping of EngineConfig field names, got {self.engine!r}")
        object.__setattr__(self, "engine", dict(self.engine))
        if isinstance(self.adapter_roots, str) or not all(
            isinstance(r, str) and r for r in self.adapter_roots
        ):
            raise ValueError(f"adapter_roots must be a list of folder paths, got {self.adapter_roots!r}")
        object.__setattr__(self, "adapter_roots", tuple(self.adapter_roots))
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address):
            raise ValueError(f"ray_address must be None, 'auto' or an address, got {self.ray_address!r}")
        check_positive("ray_connect_timeout_s", self.ray_connect_timeout_s)
        check_positive("ray_lost_timeout_s", self.ray_lost_timeout_s)
        check_int("seed", self.seed, 0)
        check_positive("worker_num_cpus", self.worker_num_cpus, allow_zero=True)
        check_positive("worker_start_timeout_s", self.worker_start_timeout_s)
        check_int("max_start_attempts", self.max_start_attempts, 1)
        check_positive("start_backoff_s", self.start_backoff_s, allow_zero=True)
        check_int("max_migrations_per_pass", self.max_migrations_per_pass, 0)
        check_int("min_remaining_tokens", self.min_remaining_tokens, 0)

    @property
    def worker_num_gpus(self) -> float:
        return 1.0 if self.device == "cuda" else 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FleetConfig:
        """Build from a parsed YAML mapping; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown fleet config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**values)
