"""Which adapters exist, which sit in host memory, and which occupy a GPU slot.

Three tiers: a registry (name -> source directory), a host-memory LRU bounded in bytes, and the
``LoraSlotPool`` slots with LRU eviction. A running sequence pins its adapter's slot (``acquire`` /
``release``); a pinned slot is never evicted.

Disk loads run on one loader thread: reading the safetensors file straight into the pool's slot
layout (``adapter_reader.read_packed``, page-locked on CUDA) and validating it take tens of
milliseconds for a 7B adapter, and the engine's step must not wait for them. The reader spends
that time mostly in system calls and torch operations, which release Python's lock, so the step
thread keeps running meanwhile. ``can_acquire`` starts a missing adapter's load and answers False
until it is in host memory, so the scheduler keeps stepping the running sequences meanwhile; a
failed load is kept and raised by the next ``acquire`` of that adapter, which fails that request
with the reason.

On CUDA an upload (one host-to-device copy plus one scatter launch) runs on a side stream and
records an event; a step waits (on the device, not the host) only for the events of the slots its
batch uses.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.worker import fault_points
from lorafleet.worker.adapter_reader import init_loader_thread, read_packed
from lorafleet.worker.adapters import validate_adapter_dir
from lorafleet.worker.lora_pool import LoraSlotPool, PackedAdapter
from lorafleet.worker.model_config import ModelConfig

log = logging.getLogger(__name__)

# Pinned buffers page-locked at start-up for adapter loads (at most this many; see
# AdapterCache.reserve_pinned_buffers).
MAX_RESERVED_PINNED = 8


def pinned_buffers_to_reserve(host_cache_bytes: int, packed_nbytes: int) -> int:
    """Packed buffers alive at once while the host cache fills: its entries plus one load in flight
    (the cache evicts only after that load lands), capped at MAX_RESERVED_PINNED."""
    return max(1, min(MAX_RESERVED_PINNED, host_cache_bytes // max(packed_nbytes, 1) + 1))


@dataclass
class _PendingUpload:
    packed: PackedAdapter  # kept alive until the asynchronous copy has finished
    start: torch.cuda.Event
    done: torch.cuda.Event
    host_seconds: float


def _load_packed(
    name: str, path: str, model_config: ModelConfig, pool: LoraSlotPool, pin: bool
) -> PackedAdapter:
    """Disk -> validated, packed host buffer. Runs on the loader thread: it touches no cache state,
    only the (immutable) model config and pool layout."""
    fault_points.pause(f"adapter_load:{name}")  # tests only: a slow disk to kill the worker in
    return read_packed(path, model_config, pool, name=name, pin=pin)


class AdapterCache:
    def __init__(
        self,
        model_config: ModelConfig,
        pool: LoraSlotPool,
        *,
        host_cache_bytes: int,
        dtype: torch.dtype,
        background_loads: bool | None = None,
    ) -> None:
        if host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {host_cache_bytes}")
        self.model_config = model_config
        self.pool = pool
        self.host_cache_bytes = host_cache_bytes
        self.dtype = dtype
        self._cuda = pool.device.type == "cuda"
        # Default: on the loader thread on CUDA. On the CPU a demo-sized adapter loads in about a
        # millisecond, and loading at admission keeps CPU runs step-for-step deterministic (the same
        # admissions in the same steps), which the CPU tests and the torch oracle rely on.
        self.background_loads = self._cuda if background_loads is None else background_loads
        self._stream = torch.cuda.Stream(device=pool.device) if self._cuda else None
        self._registry: dict[str, str] = {}
        self._host: OrderedDict[str, PackedAdapter] = OrderedDict()  # oldest first
        self._host_bytes = 0
        # Loaded but not (or no longer) in the host LRU (bigger than its budget, or pushed out)
        # and not uploaded yet: held so the request that asked for it can still be served.
        self._ready: OrderedDict[str, PackedAdapter] = OrderedDict()
        self._fresh: dict[str, float] = {}  # disk seconds of loads not yet counted in an upload
        self._loading: dict[str, Future[PackedAdapter]] = {}
        self._failed: dict[str, BaseException] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * pool.n_slots
        self._pins: dict[str, int] = {}
        self._slot_lru: OrderedDict[str, None] = OrderedDict()  # resident and unpinned, oldest first
        self._pending: dict[str, _PendingUpload] = {}
        # Uploads whose slot was taken again before their timing events completed: still timed.
        self._evicted_pending: list[_PendingUpload] = []
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

    def close(self) -> None:
        """Stop the loader thread (queued loads are cancelled; a running one is left to finish)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._loading.clear()

    def reserve_pinned_buffers(self) -> int:
        """CUDA: page-lock the pinned buffers that loads will read into, now; how many it got.

        Page-locking a packed adapter's buffer (cudaHostAlloc, 128 MB for the 7B shape at r16) takes
        tens of milliseconds and holds the CUDA driver, so a load that allocates one stalls the step
        thread's launches for as long: on an H200, a 58-68 ms step at the start of a load, when the
        one buffer reserved before was held by an adapter in the host cache. Allocated together here
        and freed at once, the buffers stay in torch's caching host allocator, which hands them to
        loads; new ones are page-locked only when more adapters than that are in host memory at
        once. It is no more than the host cache pins as it fills, plus one load."""
        if not self._cuda:
            return 0
        n = pinned_buffers_to_reserve(self.host_cache_bytes, self.pool.packed_nbytes)
        buffers: list[torch.Tensor] = []
        try:
            for _ in range(n):
                buffers.append(self.pool.new_buffer(pin=True))
        except RuntimeError as exc:  # the OS caps page-locked memory; loads then lock their own
            log.warning("reserved %d of %d pinned adapter buffers: %s", len(buffers), n, exc)
        reserved = len(buffers)
        del buffers  # freed into torch's caching host allocator, which keeps them page-locked
        return reserved

    # --- host tier (loads on the loader thread) ---
    def loading(self) -> bool:
        """Whether a disk load is in flight."""
        self._collect_loads()
        return bool(self._loading)

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until some in-flight load finishes, or ``timeout_s`` passes (at once when none)."""
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        if self._loading:
            concurrent.futures.wait(
                list(self._loading.values()),
                timeout=timeout_s,
                return_when=concurrent.futures.FIRST_COMPLETED,
            )

    def _start_load(self, name: str) -> Future[PackedAdapter]:
        future = self._loading.get(name)
        if future is None and not self.background_loads:
            future = Future()
            try:  # on this thread, now; the result goes the same way as a background load's
                future.set_result(_load_packed(name, self._registry[name], *self._load_args()))
            except Exception as exc:
                future.set_exception(exc)
            self._loading[name] = future
        elif future is None:
            if self._executor is None:
                # The initializer must not reference self: the thread keeps it for its lifetime,
                # and the executor's thread only exits once the executor (owned by self) is freed.
                device: int | None = None
                if self._cuda:  # "cuda" without an index means the current device
                    index = self.pool.device.index
                    device = torch.cuda.current_device() if index is None else index
                self._executor = ThreadPoolExecutor(
                    1, thread_name_prefix="adapter-loader", initializer=init_loader_thread, initargs=(device,)
                )
            future = self._executor.submit(_load_packed, name, self._registry[name], *self._load_args())
            self._loading[name] = future
        return future

    def _load_args(self) -> tuple[ModelConfig, LoraSlotPool, bool]:
        return self.model_config, self.pool, self._cuda

    def _collect_loads(self) -> None:
        """Move finished loads into host memory (or into the failures). Main thread only."""
        for name, future in [(n, f) for n, f in self._loading.items() if f.done()]:
            del self._loading[name]
            exc = future.exception()
            if exc is not None:
                self._failed[name] = exc
                continue
            packed = future.result()
            self.loads += 1
            self._fresh[name] = packed.read_seconds + packed.pack_seconds
            if packed.nbytes <= self.host_cache_bytes:
                self._host[name] = packed
                self._host_bytes += packed.nbytes
                while self._host_bytes > self.host_cache_bytes:
                    old_name, old = self._host.popitem(last=False)
                    self._host_bytes -= old.nbytes
                    self._keep_if_unused(old_name, old)
            else:
                self._keep_if_unused(name, packed)

    def _keep_if_unused(self, name: str, packed: PackedAdapter) -> None:
        # A load nobody has uploaded yet was asked for by a waiting request: keep it for that
        # request (at most n_slots of them; more could not be uploaded at once anyway).
        if name in self._fresh and name not in self._slot_of:
            self._ready[name] = packed
            while len(self._ready) > self.pool.n_slots:
                old, _ = self._ready.popitem(last=False)
                self._fresh.pop(old, None)

    def _host_lookup(self, name: str) -> PackedAdapter | None:
        packed = self._host.get(name)
        if packed is not None:
            self._host.move_to_end(name)
            return packed
        return self._ready.get(name)

    def _host_packed(self, name: str) -> PackedAdapter:
        """The packed adapter in host memory, loading it now (blocking) when it is not there."""
        for attempt in range(2):
            exc = self._failed.pop(name, None)
            if exc is not None:
                raise exc  # once: the next request for this adapter tries the disk again
            # Looked up before collecting other loads, whose insertion could push it out of the LRU.
            packed = self._host_lookup(name)
            if packed is not None:
                return packed
            if attempt == 0:
                concurrent.futures.wait([self._start_load(name)])
                self._collect_loads()  # a finished load lands in the LRU or in _ready
        raise AssertionError(f"adapter {name!r}: a finished load is neither in host memory nor failed")

    # --- GPU slot tier ---
    def can_acquire(self, name: str | None) -> bool:
        """Whether ``acquire(name)`` would return now without waiting for the disk.

        True when resident; when in host memory (or its load failed: ``acquire`` raises the
        reason) and a slot is free or evictable; and for an unknown name (``acquire`` raises).
        Otherwise False, and an adapter not in host memory starts loading in the background.
        Without ``background_loads``, host memory is not required: ``acquire`` reads the disk.
        """
        if name is None or name in self._slot_of or name not in self._registry:
            return True
        self._collect_loads()
        if name in self._failed:
            return True
        if self._host_lookup(name) is None and self.background_loads:
            self._start_load(name)
            return False
        return None in self._owner or bool(self._slot_lru)

    def acquire(self, name: str | None) -> int:
        """Pin ``name`` in a slot (uploading it if needed) and return the slot; -1 for the base model.

        Called without ``can_acquire`` first, it loads a missing adapter synchronously. Raises
        KeyError for an unknown adapter, RuntimeError when every slot is pinned, and the load's
        error (e.g. AdapterFormatError) when reading the adapter failed.
        """
        if name is None:
            return -1
        if name not in self._registry:
            raise KeyError(f"unknown adapter {name!r}")
        slot = self._slot_of.get(name)
        if slot is None:
            if None not in self._owner and not self._slot_lru:
                raise RuntimeError(f"all {self.pool.n_slots} LoRA slots are pinned by running sequences")
            packed = self._host_packed(name)
            slot = self._take_slot()
            self.misses += 1
            try:
                self._upload(name, slot, packed)
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

    def bookkeeping_sizes(self) -> dict[str, int]:
        """Entries of each per-adapter structure (soak leak checks: bounded by the registered names)."""
        return {
            "adapters_registered": len(self._registry),
            "host_cached": len(self._host),
            "host_cached_bytes": self._host_bytes,
            "ready": len(self._ready),
            "fresh": len(self._fresh),
            "loading": len(self._loading),
            "failed": len(self._failed),
            "pins": len(self._pins),
            "pending_uploads": len(self._pending),
            "evicted_pending_uploads": len(self._evicted_pending),
        }

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
        # With overlapped stepping the host can evict an adapter whose upload the device has not
        # finished yet (the next upload into the slot is queued behind it on the same stream); its
        # time is still recorded once its events complete.
        victim_upload = self._pending.pop(victim, None)
        if victim_upload is not None:
            self._evicted_pending.append(victim_upload)
        return slot

    def _upload(self, name: str, slot: int, packed: PackedAdapter) -> None:
        disk_seconds = self._fresh.pop(name, None)
        if disk_seconds is None:
            self.host_hits += 1
            disk_seconds = 0.0
        self._ready.pop(name, None)
        if not self._cuda or self._stream is None:
            t0 = time.perf_counter()
            self.pool.write_packed(slot, packed)
            self._load_seconds.append(disk_seconds + time.perf_counter() - t0)
            return
        main = torch.cuda.current_stream(self.pool.device)
        # The slot's previous adapter may still be read by kernels queued on the main stream.
        self._stream.wait_stream(main)
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            start.record()
            self.pool.write_packed(slot, packed, non_blocking=True)
            done.record()
        self._pending[name] = _PendingUpload(packed, start, done, disk_seconds)

    def _collect(self) -> None:
        for name in [n for n, p in self._pending.items() if p.done.query()]:
            self._record(self._pending.pop(name))
        if self._evicted_pending:
            still = []
            for p in self._evicted_pending:
                if p.done.query():
                    self._record(p)
                else:
                    still.append(p)
            self._evicted_pending = still

    def _record(self, p: _PendingUpload) -> None:
        self._load_seconds.append(p.host_seconds + p.start.elapsed_time(p.done) / 1000.0)

    def _drop(self, name: str) -> None:
        packed = self._host.pop(name, None)
        if packed is not None:
            self._host_bytes -= packed.nbytes
        self._ready.pop(name, None)
        self._fresh.pop(name, None)
        self._failed.pop(name, None)
        self._loading.pop(name, None)  # a load in flight finishes unseen: its result is dropped
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            self._owner[slot] = None
            self._slot_lru.pop(name, None)
            self._pending.pop(name, None)
