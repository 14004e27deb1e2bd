"""The engine's tuning knobs: one frozen, validated dataclass (YAML keys and CLI flags map 1:1)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lorafleet.worker.graph_schedule import GRAPH_CAPTURE_MODES
from lorafleet.worker.lora_pool import PROJECTIONS

_GIB = 1 << 30
LORA_SIDE_STREAM_MODES = ("off", "full", "shrink")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # sequences per step
    max_num_batched_tokens: int = 2048  # token rows per step (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # explicit KV capacity in blocks ...
    kv_cache_bytes: int | None = None  # ... or as a byte budget ...
    gpu_memory_fraction: float = 0.85  # ... or, on CUDA with neither set, this share of free memory
    cpu_kv_cache_bytes: int = 1 * _GIB  # ... or, on the CPU with neither set, this budget
    max_model_len: int | None = None  # context limit; default the model's max_position_embeddings
    max_loras: int = 8  # GPU adapter slots
    max_lora_rank: int = 64  # r_max of the slot pool
    host_cache_bytes: int = 4 * _GIB  # host-memory adapter LRU budget
    lora_target_modules: tuple[str, ...] = PROJECTIONS
    seed: int = 0  # the engine generator that unseeded sampled requests draw from
    enforce_eager: bool = False  # CUDA: run every step eagerly instead of replaying CUDA graphs (debugging)
    # CUDA: steps that carry prefill rows replay graphs captured per token-row bucket up to this many
    # rows (0 = such steps run eagerly); longer steps run eagerly.
    max_graph_tokens: int = 2048
    # CUDA: when the graphs of steps with prefill rows past 256 rows are captured. "start": all before
    # the engine serves. "idle": one graph at a time while the engine holds no sequence
    # (Engine.run_idle_work), such steps running eagerly until then (a 1,025-row adapter prefill on
    # the 7B shape: 54.5 ms instead of 32.7). Measured on an H200, the 36 graphs cost 3.9 s of a warm
    # start-up (7.1 s in all); what made the cold one 25.6 s was compiling the kernels, which both
    # modes pay. So "start" is the default; "idle" suits a fleet that must scale up within seconds.
    graph_capture: str = "start"
    # Overlap the host's work for the next step with the device's current one (step() then returns
    # the previous step's tokens). None = on for CUDA, off for the CPU, where nothing would overlap.
    async_scheduling: bool | None = None
    # CUDA: run LoRA kernels on a second stream beside each base matmul (ignored on the CPU). "off";
    # "full": shrink and expand beside it, joined by an add; "shrink": the shrink beside it, the
    # expand after it. true / false mean "full" / "off".
    lora_side_stream: str = "off"
    # torch intra-op threads of the process the engine runs in (set when the engine is built, so the
    # threads it starts later, like a worker actor's step thread, inherit it). None leaves torch's
    # default: one per core in a plain process, 1 in a Ray worker actor (Ray sets OMP_NUM_THREADS).
    # Several CPU workers on one machine each take this many cores; a latency profile for them must
    # be measured with the same value (`lorafleet profile --engine cpu_threads=N`).
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_batched_tokens", "block_size", "max_loras", "max_lora_rank"):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len", "cpu_threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        _check_int("cpu_kv_cache_bytes", self.cpu_kv_cache_bytes, 1)
        _check_int("host_cache_bytes", self.host_cache_bytes, 0)
        _check_int("seed", self.seed, 0)
        _check_int("max_graph_tokens", self.max_graph_tokens, 0)
        if self.graph_capture not in GRAPH_CAPTURE_MODES:
            modes = GRAPH_CAPTURE_MODES
            raise ValueError(f"graph_capture must be one of {modes}, got {self.graph_capture!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        side = self.lora_side_stream
        if isinstance(side, bool):
            object.__setattr__(self, "lora_side_stream", "full" if side else "off")
        elif side not in LORA_SIDE_STREAM_MODES:
            raise ValueError(f"lora_side_stream must be one of {LORA_SIDE_STREAM_MODES}, got {side!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be true, false or null, got {self.async_scheduling!r}")
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ValueError("set at most one of num_kv_blocks and kv_cache_bytes")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction!r}")
        if self.max_lora_rank > 256:
            raise ValueError(f"max_lora_rank {self.max_lora_rank} exceeds the kernels' limit of 256")
        targets = self.lora_target_modules
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets:
            raise ValueError("lora_target_modules must name at least one projection")
        bad = [t for t in targets if t not in PROJECTIONS]
        if bad:
            raise ValueError(f"lora_target_modules: unknown projection {bad[0]!r}; known: {PROJECTIONS}")
        object.__setattr__(self, "lora_target_modules", tuple(p for p in PROJECTIONS if p in targets))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineConfig:
        """Build from a mapping (YAML section / CLI flags); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown engine option {unknown[0]!r}; known: {sorted(known)}")
        values = dict(raw)
        if "lora_target_modules" in values and isinstance(values["lora_target_modules"], list):
            values["lora_target_modules"] = tuple(values["lora_target_modules"])
        return cls(**values)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
