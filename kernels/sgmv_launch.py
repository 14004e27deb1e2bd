"""Launch configuration and launchers for the Triton SGMV kernels.

Tile sizes are chosen from shapes only (T, S, widths, r_max), never from metadata values, so the
choice needs no host sync and a captured CUDA graph replays the same kernels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lorafleet.kernels.sgmv_rows_triton import _sgmv_expand_rows_kernel
from lorafleet.kernels.sgmv_triton import _sgmv_expand_kernel, _sgmv_shrink_kernel

# Enough programs to keep every SM of a large GPU (132 on an H100/H200) busy several times over:
# these kernels are memory-bound, so parallel loads in flight are what matters.
_TARGET_PROGRAMS = 528
# Launch parameters (module-level so benchmarks/bench_sgmv.py --sweep can vary them).
SHRINK_BLOCK_K = 256
SHRINK_NUM_WARPS = 4
SHRINK_NUM_STAGES = 3
# 64-wide rank tiles take half the K chunk: two pipeline stages of A and x then fit in ~40 KB of
# shared memory, so several programs share an SM instead of one or two.
SHRINK_BLOCK_K_WIDE_R = 128
SHRINK_NUM_WARPS_WIDE_R = 4
# Expand column chunks: wide by default; narrow where the wide grid would not cover the GPU, and in
# the pipelined multi-chunk loop when a wide chunk of B would exceed EXPAND_MAX_CHUNK_BYTES (its
# pipeline stages would then leave room for only two programs per SM).
EXPAND_BLOCK_N = 256
EXPAND_NUM_WARPS = 8
EXPAND_NARROW_BLOCK_N = 128
EXPAND_NARROW_NUM_WARPS = 4
EXPAND_MAX_CHUNK_BYTES = 16384
EXPAND_NUM_STAGES = 3
# Expand re-reads a tile's split-K partials once per column program, so split_k is capped at
# REREAD_ROWS // (rows per tile): one adapter with many rows splits less. Likewise at most
# REREAD_RANKS // (rank tile width): a wide rank tile has wide partials.
REREAD_ROWS = 128
REREAD_RANKS = 512
# Programmatic dependent launch (Hopper and later): expand starts while shrink runs and loads B and y
# before waiting for shrink's partials. LORAFLEET_PDL=0 turns it off.
USE_PDL = os.environ.get("LORAFLEET_PDL", "1") != "0"
# It needs expand programs of a single column chunk (so each has all its loads ahead of the wait),
# and is used only where that makes at most PDL_MAX_PROGRAMS programs: beyond that, early programs
# mostly hold SM resources and the plain launch was faster.
PDL_MAX_PROGRAMS = 3072
# Row-wise expand (sgmv_rows_triton.py) for batches of at least ROWS_MIN_ROWS rows and at most
# ROWS_MAX_AVG_ROWS rows per segment on average (T / number of segments: shapes, no sync), i.e.
# decode with about one row per adapter, and a pool rank of at most ROWS_MAX_RANK (a wider rank
# vector leaves too few columns per program); ROWS_MAX_AVG_ROWS = 0 turns it off. Measured on an
# H200 (docs/benchmarks.md): it wins from 64 rows on (distinct r16: -10% at 64 rows, -18% at 128
# and 256) and loses below (+5% at 1 row, +8% at 32), where the tile kernel's narrow chunks spread
# the few rows over more programs. Each program adds ROWS_EXPAND_ELEMS elements of B into its row,
# fewer where the grid would otherwise have under ROWS_MIN_PROGRAMS programs.
ROWS_MAX_AVG_ROWS = float(os.environ.get("LORAFLEET_SGMV_ROWS", "1"))
ROWS_MIN_ROWS = 64
ROWS_MAX_RANK = 16
ROWS_EXPAND_ELEMS = 8192
ROWS_MIN_PROGRAMS = 264
ROWS_NUM_WARPS = 4


def pdl_enabled(t: torch.Tensor) -> bool:
    return USE_PDL and t.device.type == "cuda" and _pdl_capable(t.device.index)


@functools.cache
def _pdl_capable(index: int | None) -> bool:
    gdc = getattr(getattr(tl, "extra", None), "cuda", None)
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(gdc, "gdc_wait")


def _seg_block(num_segs: int) -> int:
    # Powers of 4 bound the number of compiled variants while keeping the in-kernel scan short.
    block = 16
    while block < num_segs:
        block *= 4
    return block


def _block_m(T: int, num_segs: int) -> int:
    """Short segments (decode) and small batches use the smallest tensor-core tile, which gives the
    most programs; long segments of a large batch (prefill) a wider tile that re-reads A and B less."""
    avg_rows = T / max(num_segs, 1)
    return 16 if avg_rows <= 24 or T <= 256 else 64


def _shrink_config(block_m: int, block_r: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of shrink."""
    if block_m != 16:
        return 64, SHRINK_NUM_WARPS
    if block_r >= 64:
        return SHRINK_BLOCK_K_WIDE_R, SHRINK_NUM_WARPS_WIDE_R
    return SHRINK_BLOCK_K, SHRINK_NUM_WARPS


def _rows_path(T: int, num_segs: int, r_max: int) -> bool:
    return (
        ROWS_MAX_AVG_ROWS > 0
        and T >= ROWS_MIN_ROWS
        and ROWS_MAX_AVG_ROWS * num_segs >= T
        and r_max <= ROWS_MAX_RANK
    )


def _block_r(r_max: int) -> int:
    return min(64, max(16, triton.next_power_of_2(r_max)))


def _max_tiles(T: int, num_segs: int, block_m: int) -> int:
    # Each segment wastes at most one partial tile.
    return max(1, min(num_segs, T) + triton.cdiv(T, block_m))


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    if delta % t.element_size():
        raise ValueError("slice stacks must be aligned to their element size")
    return delta // t.element_size()


class _ColumnPlan:
    """How output columns of 1..3 slices are cut into programs: each program covers N_PER_PROG
    columns of one slice in a loop over BLOCK_N chunks (several weight loads in flight, one segment
    lookup), with N_PER_PROG shrunk until the grid covers the GPU. With ``prefetch`` (programmatic
    dependent launch) every program gets a single chunk, unless that makes too many programs."""

    def __init__(
        self, lora_bs: Sequence[torch.Tensor], tiles: int, block_m: int, block_r: int, prefetch: bool
    ) -> None:
        self.widths = [b.shape[1] for b in lora_bs] + [0] * (3 - len(lora_bs))
        if block_m != 16:
            self.block_n, self.num_warps = 64, 4
        else:
            self.block_n, self.num_warps = EXPAND_BLOCK_N, EXPAND_NUM_WARPS
        single_chunk_programs = tiles * self._programs(self.block_n)
        self.single = prefetch and single_chunk_programs <= PDL_MAX_PROGRAMS
        if block_m == 16 and self.block_n > EXPAND_NARROW_BLOCK_N:
            if self.single:
                narrow = single_chunk_programs < _TARGET_PROGRAMS
            else:
                narrow = self.block_n * block_r * 2 > EXPAND_MAX_CHUNK_BYTES
            if narrow:
                self.block_n, self.num_warps = EXPAND_NARROW_BLOCK_N, EXPAND_NARROW_NUM_WARPS
        per_prog = 1 if self.single else triton.cdiv(max(self.widths), self.block_n)
        while per_prog > 1 and tiles * self._programs(per_prog * self.block_n) < _TARGET_PROGRAMS:
            per_prog = triton.cdiv(per_prog, 2)
        self.n_per_prog = per_prog * self.block_n
        self.n_progs = [triton.cdiv(w, self.n_per_prog) for w in self.widths]
        self.grid = (tiles, sum(self.n_progs))

    def _programs(self, n_per_prog: int) -> int:
        return sum(triton.cdiv(w, n_per_prog) for w in self.widths)


def shrink(
    x: torch.Tensor,
    lora_as: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    *,
    zero_fill: bool,
    pdl: bool = False,
) -> torch.Tensor:
    """Returns float32 partial sums ``[split_k, n_slices, T, r_max]`` (summed over split_k by expand).

    ``pdl``: let the programmatic dependent launched next (expand) start at once."""
    T, h_in = x.shape
    n_slices = len(lora_as)
    _, r_max, _ = lora_as[0].shape
    num_segs = seg_slots.shape[0]
    alloc = torch.zeros if zero_fill else torch.empty
    if T == 0 or num_segs == 0:
        # Nothing to launch; the split heuristics below divide by rows per tile.
        return alloc((1, n_slices, T, r_max), dtype=torch.float32, device=x.device)
    block_m = _block_m(T, num_segs)
    block_r = _block_r(r_max)
    num_r_tiles = triton.cdiv(r_max, block_r)
    tiles = _max_tiles(T, num_segs, block_m)
    block_k, num_warps = _shrink_config(block_m, block_r)
    # Split h_in until the grid covers the GPU. Expand re-reads every partial, so tiles with many
    # rows (one adapter with many tokens, prefill) or a wide rank tile split less.
    if block_m == 16:
        rows_per_tile = min(block_m, triton.cdiv(T, max(num_segs, 1)))
        max_split = max(1, min(16, REREAD_ROWS // rows_per_tile, REREAD_RANKS // block_r))
    else:
        max_split = 4
    split_k = 1
    while (
        tiles * n_slices * num_r_tiles * split_k < _TARGET_PROGRAMS
        and h_in // (split_k * 2) >= block_k
        and split_k < max_split
    ):
        split_k *= 2
    k_per_split = triton.cdiv(triton.cdiv(h_in, split_k), block_k) * block_k
    out = alloc((split_k, n_slices, T, r_max), dtype=torch.float32, device=x.device)
    a0 = lora_as[0]
    offs = [_elem_offset(a, a0) for a in lora_as] + [0, 0]
    grid = (tiles, split_k * num_r_tiles, n_slices)
    _sgmv_shrink_kernel[grid](
        x,
        a0,
        out,
        seg_indptr,
        seg_slots,
        ranks,
        offs[1],
        offs[2],
        num_segs,
        T,
        h_in,
        r_max,
        k_per_split,
        x.stride(0),
        a0.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        ranks.stride(0),
        NUM_R_TILES=num_r_tiles,
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SEG_BLOCK=_seg_block(num_segs),
        IEEE=x.dtype == torch.float32,
        USE_PDL=pdl,
        num_warps=num_warps,
        num_stages=SHRINK_NUM_STAGES,
    )
    return out


def _expand_args(
    y: torch.Tensor,
    partials: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    n_progs: Sequence[int],
) -> tuple:
    """The positional arguments both expand kernels take: tensors, slices 1 and 2 as element offsets
    from slice 0's stack, shapes, each slice's width, first column and first column program, and the
    strides. ``n_progs``: column programs per slice (3 entries, 0 for absent slices)."""
    n_slices = len(lora_bs)
    widths = [b.shape[1] for b in lora_bs] + [0] * (3 - n_slices)
    b0 = lora_bs[0]
    b_offs = [_elem_offset(b, b0) for b in lora_bs] + [0, 0]
    slot_strides = [b.stride(0) for b in lora_bs] + [0] * (3 - n_slices)
    return (
        y,
        partials,
        b0,
        seg_indptr,
        seg_slots,
        ranks,
        scales,
        b_offs[1],
        b_offs[2],
        seg_slots.shape[0],
        y.shape[0],
        b0.shape[2],
        *widths,
        0,
        widths[0],
        widths[0] + widths[1],
        n_progs[0],
        n_progs[0] + n_progs[1],
        y.stride(0),
        partials.stride(0),
        partials.stride(1),
        partials.stride(2),
        *slot_strides,
        ranks.stride(0),
        scales.stride(0),
    )


def expand(
    y: torch.Tensor,
    partials: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    *,
    pdl: bool = False,
) -> None:
    """``y[:, slice cols] += scale * sum_k(partials[k]) @ B.T`` for 1..3 slices, one launch.

    ``pdl``: the launch just before this one on the stream is the shrink that wrote ``partials``.
    Expand is then launched as its programmatic dependent: it starts while shrink runs and loads
    the metadata, B and y (which shrink does not write) before its grid-dependency wait."""
    T = y.shape[0]
    num_segs = seg_slots.shape[0]
    if T == 0 or num_segs == 0:
        return
    n_slices = len(lora_bs)
    r_max = lora_bs[0].shape[2]
    if _rows_path(T, num_segs, r_max):
        _expand_rows(y, partials, lora_bs, seg_indptr, seg_slots, ranks, scales, pdl)
        return
    block_m = _block_m(T, num_segs)
    block_r = _block_r(r_max)
    hoist = r_max <= block_r
    cols = _ColumnPlan(lora_bs, _max_tiles(T, num_segs, block_m), block_m, block_r, pdl and hoist)
    # Only a program with a single column chunk has all its loads ahead of the wait; without that,
    # starting early only holds SM resources shrink could use.
    pdl = cols.single
    _sgmv_expand_kernel[cols.grid](
        *_expand_args(y, partials, lora_bs, seg_indptr, seg_slots, ranks, scales, cols.n_progs),
        NUM_SPLITS=partials.shape[0],
        NUM_SLICES=n_slices,
        BLOCK_M=block_m,
        BLOCK_N=cols.block_n,
        BLOCK_R=block_r,
        N_PER_PROG=cols.n_per_prog,
        HOIST=hoist,
        SEG_BLOCK=_seg_block(num_segs),
        IEEE=y.dtype == torch.float32,
        USE_PDL=pdl,
        num_warps=cols.num_warps,
        # Without hoisting, pipelining the split-K partial loads of the inner rank loop would
        # need more shared memory than the GPU has.
        num_stages=EXPAND_NUM_STAGES if hoist else 1,
        **({"launch_pdl": True} if pdl else {}),
    )


def _expand_rows(
    y: torch.Tensor,
    partials: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    pdl: bool,
) -> None:
    T = y.shape[0]
    n_slices = len(lora_bs)
    r_max = lora_bs[0].shape[2]
    num_segs = seg_slots.shape[0]
    block_r = triton.next_power_of_2(max(r_max, 8))  # the whole rank in one vector
    widths = [b.shape[1] for b in lora_bs] + [0] * (3 - n_slices)
    block_n = max(32, ROWS_EXPAND_ELEMS // block_r)
    while block_n > 32 and T * sum(triton.cdiv(w, block_n) for w in widths) < ROWS_MIN_PROGRAMS:
        block_n //= 2
    n_progs = [triton.cdiv(w, block_n) for w in widths]
    _sgmv_expand_rows_kernel[(T, sum(n_progs))](
        *_expand_args(y, partials, lora_bs, seg_indptr, seg_slots, ranks, scales, n_progs),
        NUM_SPLITS=partials.shape[0],
        NUM_SLICES=n_slices,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        USE_PDL=pdl,
        SEG_BLOCK=_seg_block(num_segs),
        num_warps=ROWS_NUM_WARPS,
        **({"launch_pdl": True} if pdl else {}),
    )
