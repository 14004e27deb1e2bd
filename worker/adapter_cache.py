"""Which adapters exist, which sit in host memory, and which occupy a GPU slot.

Three tiers: a registry (name -> source directory), a host-memory LRU bounded in bytes (pinned on
CUDA so uploads are asynchronous), and the ``LoraSlotPool`` slots with LRU eviction. A running
sequence pins its adapter's slot (``acquire`` / ``release``); a pinned slot is never evicted.
On CUDA an upload runs on a side stream and records an event; a step waits (on the device, not
the host) only for the events of the slots its batch uses.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.worker.adapters import AdapterWeights, load_adapter, validate_adapter_dir
from lorafleet.worker.lora_pool import LoraSlotPool
from lorafleet.worker.model_config import ModelConfig


@dataclass
class _PendingUpload:
    weights: AdapterWeights  # kept alive until the asynchronous copy has finished
    start: torch.cuda.Event
    done: torch.cuda.Event
    host_seconds: float


class AdapterCache:
    def __init__(
        self,
        model_config: ModelConfig,
        pool: LoraSlotPool,
        *,
        host_cache_bytes: int,
        dtype: torch.dtype,
    ) -> None:
        if host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {host_cache_bytes}")
        self.model_config = model_config
        self.pool = pool
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self._cuda = pool.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=pool.device) if self._cuda else None
        self._registry: dict[str, str] = {}
        self._host: OrderedDict[str, AdapterWeights] = OrderedDict()  # oldest first
        self._host_bytes = 0
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * pool.n_slots
        self._pins: dict[str, int] = {}
        self._slot_lru: OrderedDict[str, None] = OrderedDict()  # resident and unpinned, oldest first
        self._pending: dict[str, _PendingUpload] = {}
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.host_hits = 0
        self._load_seconds: list[float] = []

    # --- registry ---
    def register(self, name: str, path: str | Path) -> None:
        """Validate the adapter directory (config and tensor shapes) and record it under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError("adapter name must be a non-empty string")
        path = Path(path).resolve()
        self.pool.check_fits(validate_adapter_dir(path, self.model_config))
        if name in self._registry:
            if self._pins.get(name):
                raise ValueError(f"adapter {name!r} is in use by running sequences; cannot re-register it")
            self._drop(name)
        self._registry[name] = str(path)

    def unregister(self, name: str) -> None:
        if name not in self._registry:
            raise KeyError(f"unknown adapter {name!r}")
        if self._pins.get(name):
            raise ValueError(f"adapter {name!r} is in use by running sequences; cannot remove it")
        self._drop(name)
        del self._registry[name]

    def __contains__(self, name: object) -> bool:
        return name in self._registry

    def registered(self) -> dict[str, str]:
        return dict(self._registry)

    def resident(self) -> tuple[str, ...]:
        """Adapters currently in a GPU slot."""
        return tuple(n for n in self._owner if n is not None)

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    # --- host tier ---
    def _host_weights(self, name: str) -> tuple[AdapterWeights, float]:
        """(weights, seconds spent reading them from disk now: 0 on a host-cache hit)."""
        if name not in self._registry:
            raise KeyError(f"unknown adapter {name!r}")
        weights = self._host.get(name)
        if weights is not None:
            self._host.move_to_end(name)
            self.host_hits += 1
            return weights, 0.0
        t0 = time.perf_counter()
        weights = load_adapter(self._registry[name], self.model_config, name=name, dtype=self.dtype)
        if self._cuda:
            weights = weights.pinned()
        weights.load_seconds = time.perf_counter() - t0
        self.loads += 1
        if weights.nbytes <= self.host_cache_bytes:
            self._host[name] = weights
            self._host_bytes += weights.nbytes
            while self._host_bytes > self.host_cache_bytes:
                _, old = self._host.popitem(last=False)
                self._host_bytes -= old.nbytes
        return weights, weights.load_seconds

    # --- GPU slot tier ---
    def can_acquire(self, name: str | None) -> bool:
        """Whether ``acquire(name)`` would succeed now (resident, a free slot, or an evictable one)."""
        if name is None or name in self._slot_of:
            return True
        return None in self._owner or bool(self._slot_lru)

    def acquire(self, name: str | None) -> int:
        """Pin ``name`` in a slot (uploading it if needed) and return the slot; -1 for the base model.

        Raises KeyError for an unknown adapter and RuntimeError when every slot is pinned.
        """
        if name is None:
            return -1
        if name not in self._registry:
            raise KeyError(f"unknown adapter {name!r}")
        slot = self._slot_of.get(name)
        if slot is None:
            slot = self._take_slot()
            self.misses += 1
            try:
                self._upload(name, slot)
            except BaseException:
                self._owner[slot] = None
                raise
            self._slot_of[name] = slot
            self._owner[slot] = name
        else:
            self.hits += 1
        self._pins[name] = self._pins.get(name, 0) + 1
        self._slot_lru.pop(name, None)
        return slot

    def release(self, name: str | None) -> None:
        """Unpin one use of ``name``; at zero its slot becomes evictable (most recently used)."""
        if name is None:
            return
        count = self._pins.get(name, 0)
        if count < 1:
            raise ValueError(f"adapter {name!r} released more often than acquired")
        if count == 1:
            del self._pins[name]
            if name in self._slot_of:
                self._slot_lru[name] = None
        else:
            self._pins[name] = count - 1

    def wait_for(self, names: list[str | None] | tuple[str | None, ...]) -> None:
        """Order the current stream after the uploads of ``names`` (device-side wait, no host sync)."""
        if not self._cuda:
            return
        stream = torch.cuda.current_stream(self.pool.device)
        for name in set(names):
            pending = self._pending.get(name) if name is not None else None
            if pending is not None:
                stream.wait_event(pending.done)

    def take_load_seconds(self) -> tuple[float, ...]:
        """Load times (disk + upload) of adapters finished since the last call."""
        self._collect()
        out, self._load_seconds = tuple(self._load_seconds), []
        return out

    def _take_slot(self) -> int:
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        if not self._slot_lru:
            raise RuntimeError(f"all {self.pool.n_slots} LoRA slots are pinned by running sequences")
        victim, _ = self._slot_lru.popitem(last=False)
        slot = self._slot_of.pop(victim)
        self._owner[slot] = None
        self._pending.pop(victim, None)
        return slot

    def _upload(self, name: str, slot: int) -> None:
        weights, disk_seconds = self._host_weights(name)
        if not self._cuda or self._stream is None:
            t0 = time.perf_counter()
            self.pool.write_slot(slot, weights)
            self._load_seconds.append(disk_seconds + time.perf_counter() - t0)
            return
        main = torch.cuda.current_stream(self.pool.device)
        # The slot's previous adapter may still be read by kernels queued on the main stream.
        self._stream.wait_stream(main)
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            start.record()
            self.pool.write_slot(slot, weights, non_blocking=True)
            done.record()
        self._pending[name] = _PendingUpload(weights, start, done, disk_seconds)

    def _collect(self) -> None:
        for name in [n for n, p in self._pending.items() if p.done.query()]:
            p = self._pending.pop(name)
            self._load_seconds.append(p.host_seconds + p.start.elapsed_time(p.done) / 1000.0)

    def _drop(self, name: str) -> None:
        weights = self._host.pop(name, None)
        if weights is not None:
            self._host_bytes -= weights.nbytes
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._owner[slot] = None
            self._slot_lru.pop(name, None)
            self._pending.pop(name, None)
