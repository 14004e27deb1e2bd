"""Latency profiles: what one simulated worker costs, read from a YAML file measured on a real engine.

Step latency model (seconds), fitted by `lorafleet profile` from grid measurements:

    step = step_overhead + step_overhead_per_seq * decode_seqs + base(decode_seqs)
         + per_prefill_token * prefill_tokens + per_context_token * total_context
         + per_adapter * (distinct_adapters - 1)

plus, for a worker's first step after t seconds without work, wake_up(t) (a measured table).

`base` is piecewise linear over the measured decode batch sizes (0 = a prefill-only step), extended
linearly past the largest one. The context and adapter terms are linear so that a run of decode
steps whose context grows by one token per sequence per step sums in closed form (the simulator's
fast-forward depends on it).

Shipped profiles live in `sim/profiles/NAME.yaml` and are found by name; anything else is a path.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = "profiles"  # package data of lorafleet.sim


@dataclass(frozen=True)
class EngineShape:
    """The engine limits the simulated worker enforces (same meaning as EngineConfig's fields)."""

    max_batch_size: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int
    max_loras: int
    max_model_len: int
    host_cache_adapters: int  # adapters the host LRU holds (the engine budgets bytes; one size here)

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_num_batched_tokens",
            "block_size",
            "num_kv_blocks",
            "max_loras",
            "max_model_len",
        ):
            _check_int(name, getattr(self, name), 1)
        _check_int("host_cache_adapters", self.host_cache_adapters, 0)


@dataclass(frozen=True)
class LatencyProfile:
    name: str
    engine: EngineShape
    decode_batch: tuple[int, ...]  # ascending decode-sequence counts of the base table
    decode_base_s: tuple[float, ...]  # step seconds at those counts (context and adapter terms removed)
    per_prefill_token_s: float
    per_context_token_s: float
    per_adapter_s: float
    adapter_disk_load_s: float  # an adapter not in the host cache: read from disk, then uploaded
    adapter_host_load_s: float  # an adapter in the host cache: upload to a GPU slot only
    worker_start_s: float  # from asking for a worker to it taking requests
    # The serving stack around the engine (Ray actor loop, head, gRPC), measured through a real
    # one-worker fleet: added to every step, and to each request's first token and finish (delivery).
    step_overhead_s: float = 0.0
    # The part of the stack's per-step cost that grows with the batch (each sequence's token delta is
    # built, pickled and sent by the actor while the step thread waits for the GIL): measured through
    # the same fleet with a full batch.
    step_overhead_per_seq_s: float = 0.0
    # A worker that has been idle answers its next request later (the stack's processes and threads
    # wake up): (idle seconds, extra seconds) pairs, ascending, measured one request at a time after
    # each idle gap against back to back; added to the first step after an idle spell, interpolated
    # (flat past the ends). Empty: none.
    wake_up_s: tuple[tuple[float, float], ...] = ()
    request_overhead_s: float = 0.0
    source: str = ""  # where it was measured (machine, command, date)
    samples: tuple[tuple[float, ...], ...] = field(default=(), repr=False)  # raw grid, for the record
    # base() by decode count, filled as asked: a simulation asks for the same few counts millions of times.
    _base_memo: dict[int, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.decode_batch or len(self.decode_batch) != len(self.decode_base_s):
            raise ValueError("decode_batch and decode_base_s must be non-empty and of equal length")
        if list(self.decode_batch) != sorted(set(self.decode_batch)) or self.decode_batch[0] < 0:
            raise ValueError(f"decode_batch must be ascending distinct counts >= 0, got {self.decode_batch}")
        for name in (
            "per_prefill_token_s",
            "per_context_token_s",
            "per_adapter_s",
            "adapter_disk_load_s",
            "adapter_host_load_s",
            "worker_start_s",
            "step_overhead_s",
            "step_overhead_per_seq_s",
            "request_overhead_s",
        ):
            _check_nonneg(name, getattr(self, name))
        for v in self.decode_base_s:
            _check_nonneg("decode_base_s", v)
        pairs = tuple((float(idle), float(extra)) for idle, extra in self.wake_up_s)
        for idle, extra in pairs:
            _check_nonneg("wake_up_s idle", idle)
            _check_nonneg("wake_up_s extra", extra)
        if [i for i, _ in pairs] != sorted({i for i, _ in pairs}):
            raise ValueError(f"wake_up_s idle times must be ascending and distinct, got {self.wake_up_s}")
        object.__setattr__(self, "wake_up_s", pairs)

    def base(self, decode_seqs: int) -> float:
        value = self._base_memo.get(decode_seqs)
        if value is None:
            value = self._base_memo[decode_seqs] = self._interpolate(decode_seqs)
        return value

    def _interpolate(self, decode_seqs: int) -> float:
        xs, ys = self.decode_batch, self.decode_base_s
        if len(xs) == 1:
            return ys[0]
        i = min(max(bisect_right(xs, decode_seqs) - 1, 0), len(xs) - 2)
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        # Interpolated inside the table, extended linearly outside; never below zero.
        return max(0.0, y0 + (y1 - y0) * (decode_seqs - x0) / (x1 - x0))

    def wake_s(self, idle_s: float) -> float:
        """Extra seconds of the first step after ``idle_s`` seconds without work."""
        pairs = self.wake_up_s
        if not pairs or idle_s <= pairs[0][0]:
            return pairs[0][1] if pairs else 0.0
        for (x0, y0), (x1, y1) in itertools.pairwise(pairs):
            if idle_s <= x1:
                return y0 + (y1 - y0) * (idle_s - x0) / (x1 - x0)
        return pairs[-1][1]

    def step_s(self, decode_seqs: int, prefill_tokens: int, total_context: int, adapters: int) -> float:
        base = self._base_memo.get(decode_seqs)
        if base is None:
            base = self.base(decode_seqs)
        return (
            self.step_overhead_s
            + self.step_overhead_per_seq_s * decode_seqs
            + base
            + self.per_prefill_token_s * prefill_tokens
            + self.per_context_token_s * total_context
            + self.per_adapter_s * max(0, adapters - 1)
        )

    def to_mapping(self) -> dict[str, Any]:
        e = self.engine
        return {
            "name": self.name,
            "source": self.source,
            "engine": {
                "max_batch_size": e.max_batch_size,
                "max_num_batched_tokens": e.max_num_batched_tokens,
                "block_size": e.block_size,
                "num_kv_blocks": e.num_kv_blocks,
                "max_loras": e.max_loras,
                "max_model_len": e.max_model_len,
                "host_cache_adapters": e.host_cache_adapters,
            },
            "step_latency": {
                "decode_batch": list(self.decode_batch),
                "decode_base_s": [float(v) for v in self.decode_base_s],
                "per_prefill_token_s": float(self.per_prefill_token_s),
                "per_context_token_s": float(self.per_context_token_s),
                "per_adapter_s": float(self.per_adapter_s),
            },
            "adapter_load": {
                "disk_s": float(self.adapter_disk_load_s),
                "host_s": float(self.adapter_host_load_s),
            },
            "worker_start_s": float(self.worker_start_s),
            "serving": {
                "step_overhead_s": float(self.step_overhead_s),
                "step_overhead_per_seq_s": float(self.step_overhead_per_seq_s),
                "wake_up_s": [[idle, extra] for idle, extra in self.wake_up_s],
                "request_overhead_s": float(self.request_overhead_s),
            },
            "samples": {
                "columns": ["decode_seqs", "prefill_tokens", "total_context", "adapters", "step_s"],
                "rows": [list(s) for s in self.samples],
            },
        }


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_nonneg(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def shipped_profiles() -> list[str]:
    folder = resources.files("lorafleet.sim").joinpath(PROFILE_DIR)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_path: str) -> LatencyProfile:
    """A shipped profile by name, or a profile YAML file by path; errors name the file and key."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = resources.files("lorafleet.sim").joinpath(PROFILE_DIR, f"{name_or_path}.yaml")
        if not shipped.is_file():
            raise ValueError(
                f"profile {name_or_path!r} is neither a file nor a shipped profile "
                f"(shipped: {', '.join(shipped_profiles()) or 'none'})"
            )
        return parse_profile(yaml.safe_load(shipped.read_text()), f"shipped profile {name_or_path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    return parse_profile(raw, str(path))


def parse_profile(raw: Any, where: str) -> LatencyProfile:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a profile must be a YAML mapping")

    def section(key: str) -> Mapping[str, Any]:
        value = raw.get(key)
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: missing mapping {key!r}")
        return value

    def get(sec: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in sec:
            raise ValueError(f"{where}: missing key {path}.{key}" if path else f"{where}: missing key {key}")
        return sec[key]

    engine, lat, load = section("engine"), section("step_latency"), section("adapter_load")
    serving = raw.get("serving") or {}
    if not isinstance(serving, Mapping):
        raise ValueError(f"{where}: 'serving' must be a mapping")
    samples = raw.get("samples") or {}
    rows = samples.get("rows", []) if isinstance(samples, Mapping) else []
    try:
        shape = EngineShape(
            **{
                k: get(engine, k, "engine")
                for k in (
                    "max_batch_size",
                    "max_num_batched_tokens",
                    "block_size",
                    "num_kv_blocks",
                    "max_loras",
                    "max_model_len",
                    "host_cache_adapters",
                )
            }
        )
        return LatencyProfile(
            name=str(raw.get("name", where)),
            engine=shape,
            decode_batch=tuple(get(lat, "decode_batch", "step_latency")),
            decode_base_s=tuple(get(lat, "decode_base_s", "step_latency")),
            per_prefill_token_s=get(lat, "per_prefill_token_s", "step_latency"),
            per_context_token_s=get(lat, "per_context_token_s", "step_latency"),
            per_adapter_s=get(lat, "per_adapter_s", "step_latency"),
            adapter_disk_load_s=get(load, "disk_s", "adapter_load"),
            adapter_host_load_s=get(load, "host_s", "adapter_load"),
            worker_start_s=get(raw, "worker_start_s", ""),
            step_overhead_s=serving.get("step_overhead_s", 0.0),
            step_overhead_per_seq_s=serving.get("step_overhead_per_seq_s", 0.0),
            wake_up_s=tuple(tuple(pair) for pair in serving.get("wake_up_s") or ()),
            request_overhead_s=serving.get("request_overhead_s", 0.0),
            source=str(raw.get("source", "")),
            samples=tuple(tuple(float(v) for v in r) for r in rows),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
