"""Read a PEFT adapter's weights file straight into a LoRA pool's packed slot layout.

The engine's loader thread runs this; the engine's step runs on another thread, so what matters is
the load's time and how long it holds Python's global lock. The reference path (``load_adapter``
then ``LoraSlotPool.pack``) materialises every tensor, copies it again into the packed buffer and
sums the buffer in float32 to check it: about 120 ms of CPU for a 7B r16 adapter, with ~1,800 small
torch calls and their Python in between. Here:

- the header alone is checked (``plan_projections``: the same checks and messages as
  ``load_adapter``), so nothing is read before the file is known to fit;
- tensors already in the pool's dtype whose slot region is contiguous (A always; B at rank r_max)
  are copied by the kernel from the page cache into their final place: one ``preadv`` per run of
  neighbouring tensors, i.e. one system call for a whole same-dtype full-rank adapter, with the
  lock released;
- the rest (another dtype, as PEFT's float32 files; or B of a rank below r_max, a strided region) go
  through a small reused scratch buffer, a few MiB of the file at a time, and one
  ``torch._foreach_copy_`` per chunk converts and places them;
- one ``aminmax`` over all packed weights proves them finite (NaN and Inf always reach the min or
  max); only a file that fails it is scanned tensor by tensor, to name the culprit.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.worker.adapters import (
    WEIGHTS_FILE,
    ProjPlan,
    format_error,
    non_finite_error,
    non_float_error,
    plan_projections,
    read_adapter_config,
    targeted_modules,
    weights_file,
)
from lorafleet.worker.lora_pool import LoraSlotPool, PackedAdapter
from lorafleet.worker.model_config import ModelConfig
from lorafleet.worker.safetensors_header import HeaderError, TensorEntry, read_header

# Bytes of the file converted per chunk: small enough to stay in cache between the read and the
# conversion, large enough that the per-chunk Python is negligible.
CHUNK_BYTES = 4 << 20


def _iov_max() -> int:
    try:
        return max(1, min(os.sysconf("SC_IOV_MAX"), 1024))
    except (AttributeError, ValueError, OSError):  # no sysconf, or it does not know the name
        return 16  # POSIX's minimum


_IOV_MAX = _iov_max()
_scratch = threading.local()  # one scratch buffer per loader thread, kept between loads


def init_loader_thread(cuda_device: int | None = None) -> None:
    """Set up the calling thread to run loads: torch's operations on it stay on it (one core), and
    CUDA calls (pinned allocations) go to ``cuda_device``.

    Why one core: a load is memory-bound, and a team of OpenMP threads per operation would compete
    with the step thread for the cores; where the machine is oversubscribed, each of a load's
    hundreds of operations then waits for a descheduled team member (seconds per load, measured).
    ``torch.set_num_threads`` sets the calling thread's OpenMP team size but also torch's default for
    threads that start later, so another thread puts that default back at once.
    """
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)
    before = torch.get_num_threads()  # also runs torch's per-thread setup, which would undo the next line
    if before > 1:
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(before,), name="torch-threads")
        restore.start()
        restore.join()


@dataclass
class _Convert:
    """A tensor that needs torch to place it: ``dst`` is its typed slot region, flat when contiguous
    (then the source is taken flat too), else the strided [h_out, rank] part of a B region."""

    entry: TensorEntry
    dst: torch.Tensor
    flat: bool = True


def read_packed(
    path: str | Path,
    model_config: ModelConfig,
    pool: LoraSlotPool,
    *,
    name: str | None = None,
    pin: bool = False,
) -> PackedAdapter:
    """Validate the adapter directory ``path`` and read it into one packed buffer of ``pool``'s
    layout (page-locked if ``pin``). Raises AdapterFormatError for a bad file (the same messages as
    ``load_adapter``) and ValueError when it does not fit the pool (``check_fits``'s messages).

    ``stages`` of the result holds the seconds of each step (parse, alloc, layout: planning and
    zeroing the padding, read, convert, finite); ``read_seconds`` covers parse to convert and
    ``pack_seconds`` the finite check.
    """
    t0 = time.perf_counter()
    path = Path(path)
    name = name or path.name
    cfg = read_adapter_config(path)
    wanted = targeted_modules(cfg, model_config.num_hidden_layers, path)
    wpath = weights_file(path)
    try:
        fd = os.open(wpath, os.O_RDONLY)
    except OSError as e:
        raise format_error(path, f"{WEIGHTS_FILE} cannot be read ({e})") from e
    try:
        try:
            entries = read_header(fd)
        except (HeaderError, OSError) as e:
            raise format_error(path, f"{WEIGHTS_FILE} cannot be read ({e})") from e
        plans = plan_projections(path, cfg, model_config, wanted, list(entries), lambda k: entries[k].shape)
        for p in plans:
            for key, which in ((p.a_key, "lora_A"), (p.b_key, "lora_B")):
                if not entries[key].dtype.is_floating_point:
                    raise non_float_error(path, p, which, entries[key].dtype)
        pool.check_fits_shapes(
            name, [(p.layer, p.proj, entries[p.a_key].shape, entries[p.b_key].shape) for p in plans]
        )
        t1 = time.perf_counter()
        buffer = pool.new_buffer(pin=pin)
        t2 = time.perf_counter()
        direct, convert, zero = _place(pool, buffer, plans, entries)
        for start, end in zero:
            buffer[start:end].zero_()
        t3 = time.perf_counter()
        try:
            _read_direct(fd, buffer, direct)
            t4 = time.perf_counter()
            _read_converted(fd, convert)
        except OSError as e:
            raise format_error(path, f"{WEIGHTS_FILE} cannot be read ({e})") from e
        t5 = time.perf_counter()
    finally:
        os.close(fd)
    packed = pool.finish_packed(name, str(path), buffer, [(p.layer, p.proj, p.rank, p.scale) for p in plans])
    if not pool.weights_finite(buffer):
        _raise_non_finite(path, pool, buffer, plans)
    t6 = time.perf_counter()
    packed.stages = {
        "parse": t1 - t0,
        "alloc": t2 - t1,
        "layout": t3 - t2,
        "read": t4 - t3,
        "convert": t5 - t4,
        "finite": t6 - t5,
    }
    packed.read_seconds, packed.pack_seconds = t5 - t0, t6 - t5
    return packed


def _place(
    pool: LoraSlotPool, buffer: torch.Tensor, plans: list[ProjPlan], entries: dict[str, TensorEntry]
) -> tuple[list[tuple[TensorEntry, int]], list[_Convert], list[tuple[int, int]]]:
    """Where every byte of the slot comes from: (entry, destination byte) pairs the kernel reads
    directly, tensors torch must convert or place, and byte ranges to zero (padding past a rank,
    projections the adapter skips), merged where they touch."""
    flat = pool.weights_view(buffer)
    item = pool.dtype.itemsize
    r_max = pool.r_max
    by_proj = {(p.layer, p.proj): p for p in plans}
    direct: list[tuple[TensorEntry, int]] = []
    convert: list[_Convert] = []
    zero: list[tuple[int, int]] = []

    def zero_elems(start: int, end: int) -> None:
        if start == end:
            return
        if zero and zero[-1][1] == start * item:
            zero[-1] = (zero[-1][0], end * item)
        else:
            zero.append((start * item, end * item))

    for (layer, proj), start in pool.packed_offsets.items():
        h_in, h_out = pool.shapes[proj]
        b_start = start + r_max * h_in
        end = b_start + h_out * r_max
        plan = by_proj.get((layer, proj))
        if plan is None:  # rank 0: the kernels skip it, zeros keep the slot's contents defined
            zero_elems(start, end)
            continue
        rank = plan.rank
        a, b = entries[plan.a_key], entries[plan.b_key]
        # Contiguous destinations stay flat (a slice, no view call: each torch call on this thread is
        # a chance for the step thread to keep Python's lock for up to 5 ms).
        if a.dtype == pool.dtype:
            direct.append((a, start * item))
        else:
            convert.append(_Convert(a, flat[start : start + rank * h_in]))
        zero_elems(start + rank * h_in, b_start)
        if rank == r_max and b.dtype == pool.dtype:
            direct.append((b, b_start * item))
        elif rank == r_max:
            convert.append(_Convert(b, flat[b_start:end]))
        else:  # [h_out, rank] into [h_out, r_max], strided; its padding is zeroed first
            convert.append(_Convert(b, flat[b_start:end].view(h_out, r_max)[:, :rank], flat=False))
            zero_elems(b_start, end)
    return direct, convert, zero


def _preadv(fd: int, views: list[memoryview], offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, views, offset)
    got = 0  # platforms without preadv: one pread per buffer
    for view in views:
        data = os.pread(fd, len(view), offset + got)
        view[: len(data)] = data
        got += len(data)
        if len(data) < len(view):
            break
    return got


def _preadv_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` from the file's bytes at ``offset`` on (the kernel may return fewer bytes per
    call than asked); a file that ends early (truncated while being read) raises OSError."""
    first = 0
    while first < len(views):
        got = _preadv(fd, views[first:] if first else views, offset)
        if got == 0:
            raise OSError("the file ended before its last tensor (was it changed while being read?)")
        offset += got
        while first < len(views) and got >= len(views[first]):
            got -= len(views[first])
            first += 1
        if got:
            views[first] = views[first][got:]


def _read_direct(fd: int, buffer: torch.Tensor, direct: list[tuple[TensorEntry, int]]) -> None:
    """One scatter read per run of file-adjacent tensors (at most IOV_MAX tensors a call)."""
    if not direct:
        return
    mem = memoryview(buffer.numpy())
    direct.sort(key=lambda d: d[0].start)
    run: list[memoryview] = []
    run_start = run_end = direct[0][0].start
    for entry, dst in direct:
        if entry.start != run_end or len(run) == _IOV_MAX:
            _preadv_all(fd, run, run_start)
            run, run_start = [], entry.start
        run.append(mem[dst : dst + entry.nbytes])
        run_end = entry.end
    _preadv_all(fd, run, run_start)


def _scratch_buffer(nbytes: int) -> tuple[torch.Tensor, dict[torch.dtype, torch.Tensor]]:
    """This thread's scratch (at least ``nbytes``) and its typed views, made once per buffer."""
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(-(-max(nbytes, CHUNK_BYTES) // 16) * 16, dtype=torch.uint8)
        _scratch.buffer, _scratch.typed = buf, {}
    return buf, _scratch.typed


def _read_converted(fd: int, convert: list[_Convert]) -> None:
    """Read file-adjacent tensors a chunk at a time into the scratch buffer, then convert and place
    the chunk's tensors with one ``_foreach_copy_`` (torch releases the lock while it copies)."""
    convert.sort(key=lambda c: c.entry.start)
    i = 0
    while i < len(convert):
        j, end = i + 1, convert[i].entry.end
        while (
            j < len(convert)
            and convert[j].entry.start == end
            and convert[j].entry.end - convert[i].entry.start <= CHUNK_BYTES
        ):
            end = convert[j].entry.end
            j += 1
        chunk_start = convert[i].entry.start
        # The scratch keeps the file's offsets modulo 16, so a tensor the file stores aligned stays
        # aligned for a typed view.
        pad = chunk_start % 16
        scratch, typed = _scratch_buffer(pad + end - chunk_start)
        _preadv_all(fd, [memoryview(scratch.numpy())[pad : pad + end - chunk_start]], chunk_start)
        srcs, dsts = [], []
        for c in convert[i:j]:
            e = c.entry
            at, size = pad + e.start - chunk_start, e.dtype.itemsize
            if at % size == 0:
                view = typed.get(e.dtype)
                if view is None:
                    view = typed[e.dtype] = scratch.view(e.dtype)
                src = view[at // size : (at + e.nbytes) // size]
            else:  # stored unaligned in the file: an aligned copy of its bytes can be typed
                src = scratch[at : at + e.nbytes].clone().view(e.dtype)
            srcs.append(src if c.flat else src.view(e.shape))
            dsts.append(c.dst)
        torch._foreach_copy_(dsts, srcs)
        i = j


def _raise_non_finite(path: Path, pool: LoraSlotPool, buffer: torch.Tensor, plans: list[ProjPlan]) -> None:
    """Name the first tensor holding NaN or Inf, in ``check_weights_finite``'s order (only runs for a
    file that failed the one-pass check). The values checked are the converted ones: a float32
    weight beyond bfloat16's range is Inf in the slot."""
    flat = pool.weights_view(buffer)
    r_max = pool.r_max
    for p in sorted(plans, key=lambda p: (p.layer, p.proj)):
        start = pool.packed_offsets[(p.layer, p.proj)]
        h_in, h_out = pool.shapes[p.proj]
        a = flat[start : start + p.rank * h_in]
        b = flat[start + r_max * h_in : start + r_max * (h_in + h_out)].view(h_out, r_max)[:, : p.rank]
        for t, which in ((a, "lora_A"), (b, "lora_B")):
            if not bool(torch.isfinite(t).all()):
                raise non_finite_error(path, p.layer, p.proj, which)
    raise format_error(path, "holds NaN or Inf values")
