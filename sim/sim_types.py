"""The simulator's inputs and outputs: a trace request (`SimRequest`), the fleet and policy settings
(`SimConfig`, validated, its defaults taken from the runtime's `FleetConfig`) and a run's result
(`SimResult`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from lorafleet.scheduler.fleet_config import POLICIES, FleetConfig, check_int, check_positive
from lorafleet.sim.sequences import RequestRecord

_DEFAULTS = {f.name: f.default for f in fields(FleetConfig)}  # the runtime's defaults, kept in step


@dataclass(frozen=True)
class SimRequest:
    at_s: float
    adapter: str | None
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class SimConfig:
    policy: str = "packing"
    pack_batch_target: int | None = None  # placement fills a worker to this batch; None: engine limit
    max_gpus: int = 1
    min_gpus: int = _DEFAULTS["min_workers"]
    migrations: bool = True  # False: consolidation still evicts and releases, but moves nothing
    consolidation_interval_s: float = _DEFAULTS["consolidation_interval_s"]
    idle_release_s: float = _DEFAULTS["idle_release_s"]
    max_migrations_per_pass: int = _DEFAULTS["max_migrations_per_pass"]
    min_remaining_tokens: int = _DEFAULTS["min_remaining_tokens"]
    placement_interval_s: float = 0.0  # >0 batches admissions into passes at most this often
    keep_index: bool = True  # keep the placement index across passes (False: rebuild it every pass)
    # Workers sharing this many CPU cores (CPU validation): a step planned while n workers compute
    # takes max(1, n / cpu_cores) times its profiled time. None: every worker has its own device.
    cpu_cores: float | None = None
    seed: int = _DEFAULTS["seed"]

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.pack_batch_target is not None:
            check_int("pack_batch_target", self.pack_batch_target, 1)
        check_int("max_gpus", self.max_gpus, 1)
        check_int("min_gpus", self.min_gpus, 1)
        if self.min_gpus > self.max_gpus:
            raise ValueError(f"max_gpus ({self.max_gpus}) must be >= min_gpus ({self.min_gpus})")
        check_positive("consolidation_interval_s", self.consolidation_interval_s)
        check_positive("idle_release_s", self.idle_release_s, allow_zero=True)
        check_int("max_migrations_per_pass", self.max_migrations_per_pass, 0)
        check_int("min_remaining_tokens", self.min_remaining_tokens, 0)
        check_positive("placement_interval_s", self.placement_interval_s, allow_zero=True)
        check_int("seed", self.seed, 0)
        if self.cpu_cores is not None:
            check_positive("cpu_cores", self.cpu_cores)

    @property
    def label(self) -> str:
        label = self.policy if self.migrations else f"{self.policy}-no-migration"
        return label if self.pack_batch_target is None else f"{label}-target{self.pack_batch_target}"


@dataclass
class SimResult:
    config: SimConfig
    profile: str
    records: list[RequestRecord]
    end_s: float
    gpu_seconds: float
    peak_gpus: int
    migrations: int
    evictions: int
    requeued_migrations: int
    preemptions: int
    adapter_loads: int  # GPU slot fills (from the host cache or disk)
    worker_starts: int
    workers_released: int
    gpus_over_time: list[tuple[float, int]] = field(default_factory=list)  # (t, live) at each change
    adapter_disk_loads: int = 0  # of adapter_loads, those read from disk
    busy_over_time: list[tuple[float, int, int]] = field(default_factory=list)  # (t, live, busy) changes
    sim_wall_s: float = 0.0
