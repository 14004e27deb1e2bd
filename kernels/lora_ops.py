"""Public multi-LoRA operators: ``add_lora``, ``add_lora_slices`` (also in two halves: ``shrink_slices``,
``expand_slices``), ``sgmv_shrink``, ``sgmv_expand``.

Each checks its arguments before anything is launched (a bad argument raises ``ValueError`` naming
it) and dispatches to the Triton kernels or to the plain torch path.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.kernels import sgmv_torch
from lorafleet.kernels.dispatch import FLOAT_DTYPES, checks_values, fail, resolve_backend

MAX_SLICES = 3
MAX_RANK = 256


def _as_list(value: torch.Tensor | Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    items = [value] if isinstance(value, torch.Tensor) else list(value)
    if not 1 <= len(items) <= MAX_SLICES:
        fail(name, f"expected 1 to {MAX_SLICES} slices, got {len(items)}")
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            fail(name, f"slice {i} is {type(t).__name__}, not a torch.Tensor")
    return items


@dataclass(frozen=True)
class _Checked:
    """Validated arguments, normalised to per-slice lists and [n_slices, n_slots] rank/scale tables."""

    lora_as: list[torch.Tensor] | None
    lora_bs: list[torch.Tensor] | None
    ranks: torch.Tensor  # [n_slices, n_slots] int32
    scales: torch.Tensor  # [n_slices, n_slots] float32
    n_slots: int
    r_max: int


def _check_rows(x: torch.Tensor, name: str, device: torch.device, dtype: torch.dtype | None) -> None:
    if not isinstance(x, torch.Tensor):
        fail(name, f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        fail(name, f"expected 2-D [T, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        fail(name, f"dtype {x.dtype} is not float16, bfloat16 or float32")
    if dtype is not None and x.dtype != dtype:
        fail(name, f"dtype {x.dtype} differs from y's {dtype}")
    if x.device != device:
        fail(name, f"on {x.device}, expected {device}")
    if x.shape[1] > 0 and x.stride(1) != 1:
        fail(name, "the last dimension must be contiguous (stride 1)")


def _check_stack(t: torch.Tensor, name: str, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 3:
        fail(name, f"expected 3-D [n_slots, ., .], got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        fail(name, f"dtype {t.dtype} differs from x's {dtype}")
    if t.device != device:
        fail(name, f"on {t.device}, expected {device}")
    if not t.is_contiguous():
        fail(name, "must be contiguous")


def _per_slice_table(
    value: torch.Tensor | Sequence[torch.Tensor] | None,
    name: str,
    n_slices: int,
    n_slots: int,
    dtype: torch.dtype,
    fill: float,
    device: torch.device,
) -> torch.Tensor:
    if value is None:
        return torch.full((n_slices, n_slots), fill, dtype=dtype, device=device)
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        table = value
    else:
        if isinstance(value, torch.Tensor):
            if value.dim() != 1:
                fail(name, f"expected [n_slots] or [n_slices, n_slots], got shape {tuple(value.shape)}")
            # One table shared by every slice: a stride-0 view, no copy.
            value = value.unsqueeze(0).expand(n_slices, -1) if n_slices > 1 else value.unsqueeze(0)
            return _finish_table(value, name, n_slices, n_slots, dtype, device)
        items = list(value)
        if len(items) != n_slices:
            fail(name, f"got {len(items)} tables for {n_slices} slices")
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                fail(name, f"slice {i}: expected a 1-D tensor [n_slots]")
        table = items[0].unsqueeze(0) if n_slices == 1 else torch.stack(items)
    return _finish_table(table, name, n_slices, n_slots, dtype, device)


def _finish_table(
    table: torch.Tensor, name: str, n_slices: int, n_slots: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    if tuple(table.shape) != (n_slices, n_slots):
        fail(name, f"expected shape [{n_slots}] per slice, got {tuple(table.shape)}")
    if table.dtype != dtype:
        fail(name, f"dtype {table.dtype}, expected {dtype}")
    if table.device != device:
        fail(name, f"on {table.device}, expected {device}")
    return table if table.stride(1) == 1 else table.contiguous()


def _check_metadata(
    seg_indptr: torch.Tensor, seg_slots: torch.Tensor, T: int, n_slots: int, device: torch.device
) -> None:
    for name, t in (("seg_indptr", seg_indptr), ("seg_slots", seg_slots)):
        if not isinstance(t, torch.Tensor):
            fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.dtype != torch.int32:
            fail(name, f"expected a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
        if t.device != device:
            fail(name, f"on {t.device}, expected {device}")
        if not t.is_contiguous():
            fail(name, "must be contiguous")
    if seg_indptr.shape[0] != seg_slots.shape[0] + 1:
        fail(
            "seg_indptr",
            f"length {seg_indptr.shape[0]} must be len(seg_slots) + 1 = {seg_slots.shape[0] + 1}",
        )
    if not checks_values(device):
        return
    bounds = seg_indptr.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        fail("seg_indptr", f"must start at 0 and end at T={T}, got {bounds[0]}..{bounds[-1]}")
    if any(b < a for a, b in itertools.pairwise(bounds)):
        fail("seg_indptr", "must be non-decreasing")
    slots = seg_slots.tolist()
    bad = [k for k in slots if not -1 <= k < n_slots]
    if bad:
        fail("seg_slots", f"slot {bad[0]} outside [-1, {n_slots})")


def _check_tables(ranks: torch.Tensor, r_max: int, device: torch.device) -> None:
    if not checks_values(device):
        return
    if ranks.numel() and (int(ranks.min()) < 0 or int(ranks.max()) > r_max):
        fail("ranks", f"every rank must be in [0, r_max={r_max}]")


def _check_common(
    x_like: torch.Tensor,
    T: int,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    n_slices: int,
    n_slots: int,
    r_max: int,
    ranks,
    scales,
) -> tuple[torch.Tensor, torch.Tensor]:
    device = x_like.device
    if r_max > MAX_RANK:
        fail("lora_a", f"r_max {r_max} exceeds the supported {MAX_RANK}")
    _check_metadata(seg_indptr, seg_slots, T, n_slots, device)
    rank_table = _per_slice_table(ranks, "ranks", n_slices, n_slots, torch.int32, r_max, device)
    scale_table = _per_slice_table(scales, "scales", n_slices, n_slots, torch.float32, 1.0, device)
    _check_tables(rank_table, r_max, device)
    return rank_table, scale_table


def _validate(
    y: torch.Tensor | None,
    x: torch.Tensor | None,
    lora_a,
    lora_b,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    ranks,
    scales,
    T_hint: int | None = None,
) -> _Checked:
    ref = y if y is not None else x
    assert ref is not None
    device = ref.device
    if y is not None:
        _check_rows(y, "y", device, None)
    if x is not None:
        _check_rows(x, "x", device, y.dtype if y is not None else None)
        if y is not None and x.shape[0] != y.shape[0]:
            fail("x", f"has {x.shape[0]} rows but y has {y.shape[0]}")
    dtype = ref.dtype
    T = ref.shape[0] if T_hint is None else T_hint
    lora_as = lora_bs = None
    n_slots = r_max = -1
    if lora_a is not None:
        lora_as = _as_list(lora_a, "lora_a")
        for i, a in enumerate(lora_as):
            _check_stack(a, "lora_a" if len(lora_as) == 1 else f"lora_a[{i}]", dtype, device)
            if a.shape != lora_as[0].shape:
                fail("lora_a", f"slice {i} has shape {tuple(a.shape)}, slice 0 {tuple(lora_as[0].shape)}")
        n_slots, r_max, h_in = lora_as[0].shape
        if x is not None and h_in != x.shape[1]:
            fail("lora_a", f"h_in {h_in} differs from x's hidden size {x.shape[1]}")
    if lora_b is not None:
        lora_bs = _as_list(lora_b, "lora_b")
        for i, b in enumerate(lora_bs):
            _check_stack(b, "lora_b" if len(lora_bs) == 1 else f"lora_b[{i}]", dtype, device)
        if n_slots < 0:
            n_slots, r_max = lora_bs[0].shape[0], lora_bs[0].shape[2]
        for i, b in enumerate(lora_bs):
            if b.shape[0] != n_slots or b.shape[2] != r_max:
                fail(
                    "lora_b",
                    f"slice {i} shape {tuple(b.shape)} does not match n_slots={n_slots}, r_max={r_max}",
                )
        if lora_as is not None and len(lora_as) != len(lora_bs):
            fail("lora_b", f"{len(lora_bs)} slices but lora_a has {len(lora_as)}")
        if y is not None and sum(b.shape[1] for b in lora_bs) != y.shape[1]:
            widths = [b.shape[1] for b in lora_bs]
            fail("lora_b", f"output widths {widths} sum to {sum(widths)}, y has {y.shape[1]} columns")
    n_slices = len(lora_as if lora_as is not None else lora_bs)  # type: ignore[arg-type]
    rank_table, scale_table = _check_common(
        ref, T, seg_indptr, seg_slots, n_slices, n_slots, r_max, ranks, scales
    )
    return _Checked(lora_as, lora_bs, rank_table, scale_table, n_slots, r_max)


def sgmv_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor | Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    ranks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Segmented shrink: ``out[s, i, :rank] = x[i] @ lora_a[s][k, :rank].T`` for rows i of segments
    with slot ``k >= 0``; every other entry of ``out`` is 0.

    x:          [T, h_in] float16 / bfloat16 / float32, last dim contiguous
    lora_a:     [n_slots, r_max, h_in] contiguous, or a list of 1..3 such stacks (one per slice)
    seg_indptr: [S+1] int32; seg_slots: [S] int32 (-1 = no adapter)
    ranks:      [n_slots] int32 (shared by slices), a list per slice, or [n_slices, n_slots]
    returns:    [n_slices, T, r_max] float32
    """
    c = _validate(None, x, lora_a, None, seg_indptr, seg_slots, ranks, None)
    assert c.lora_as is not None
    if resolve_backend(backend, x.device) == "torch":
        return sgmv_torch.shrink_torch(x, c.lora_as, seg_indptr, seg_slots, list(c.ranks))
    from lorafleet.kernels import sgmv_launch

    partials = sgmv_launch.shrink(x, c.lora_as, seg_indptr, seg_slots, c.ranks, zero_fill=True)
    return partials.sum(0) if partials.shape[0] > 1 else partials[0]


def sgmv_expand(
    y: torch.Tensor,
    inter: torch.Tensor,
    lora_b: torch.Tensor | Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    ranks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scales: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """Segmented multi-slice expand, in place: for slice s (output columns ``[off_s, off_s + w_s)``,
    offsets the running sum of widths) and rows i of a segment with slot ``k >= 0``:
    ``y[i, off_s:off_s+w_s] += scales_s[k] * inter[s, i, :rank] @ lora_b[s][k, :, :rank].T``.

    y:      [T, sum(w_s)] float16 / bfloat16 / float32, last dim contiguous
    inter:  [n_slices, T, r_max] float32 (the output of ``sgmv_shrink``)
    lora_b: [n_slots, w, r_max] contiguous, or a list of 1..3 such stacks of widths w_s
    ranks:  as for ``sgmv_shrink``; scales: float32, same forms (default 1)
    """
    c = _validate(y, None, None, lora_b, seg_indptr, seg_slots, ranks, scales)
    assert c.lora_bs is not None
    n_slices = len(c.lora_bs)
    if (
        not isinstance(inter, torch.Tensor)
        or inter.dtype != torch.float32
        or tuple(inter.shape) != (n_slices, y.shape[0], c.r_max)
        or inter.device != y.device
    ):
        got = (inter.dtype, tuple(inter.shape)) if isinstance(inter, torch.Tensor) else type(inter)
        fail("inter", f"expected float32 [{n_slices}, {y.shape[0]}, {c.r_max}] on {y.device}, got {got}")
    if not inter.is_contiguous():
        fail("inter", "must be contiguous")
    if resolve_backend(backend, y.device) == "torch":
        offsets = _offsets(c.lora_bs)
        sgmv_torch.expand_torch(
            y, inter, c.lora_bs, seg_indptr, seg_slots, list(c.ranks), list(c.scales), offsets
        )
        return
    from lorafleet.kernels import sgmv_launch

    sgmv_launch.expand(y, inter.unsqueeze(0), c.lora_bs, seg_indptr, seg_slots, c.ranks, c.scales)


def _offsets(lora_bs: Sequence[torch.Tensor]) -> list[int]:
    offsets, acc = [], 0
    for b in lora_bs:
        offsets.append(acc)
        acc += b.shape[1]
    return offsets


def add_lora_slices(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor | Sequence[torch.Tensor],
    lora_b: torch.Tensor | Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    ranks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scales: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """``add_lora`` for a fused projection of 1..3 slices (q|k|v or gate|up), in two launches.

    y: [T, sum(w_s)]; lora_a: list of [n_slots, r_max, h_in]; lora_b: list of [n_slots, w_s, r_max];
    ranks / scales: per slice (a list, or one [n_slots] table shared by all slices).
    For slice s, rows i of a segment with slot k >= 0:
    ``y[i, off_s:off_s+w_s] += scales_s[k] * (x[i] @ A_s[k, :r].T) @ B_s[k, :, :r].T``, r = ranks_s[k].
    """
    c = _validate(y, x, lora_a, lora_b, seg_indptr, seg_slots, ranks, scales)
    # Back to back on one stream, the expand may start as the shrink's programmatic dependent.
    _expand(y, _shrink(c, x, seg_indptr, seg_slots, backend, pdl=True), adjacent=True)


@dataclass(frozen=True)
class LoraShrunk:
    """``add_lora_slices`` cut at its rank-sized intermediate: what the expand half still needs.

    Made by ``shrink_slices``, consumed by ``expand_slices``. In between the caller may run other
    work, on another stream too, as long as the expand is ordered after the shrink: the engine runs
    the shrink beside the base matmul that reads the same ``x``, and the expand after it."""

    # float32: the Triton path's partial sums [split_k, n_slices, T, r_max], or the torch path's
    # finished [n_slices, T, r_max]
    inter: torch.Tensor
    lora_bs: list[torch.Tensor]
    seg_indptr: torch.Tensor
    seg_slots: torch.Tensor
    ranks: torch.Tensor  # [n_slices, n_slots] int32
    scales: torch.Tensor  # [n_slices, n_slots] float32
    rows: int
    dtype: torch.dtype
    on_torch: bool  # the torch path made it (and will expand it)


def _shrink(
    c: _Checked,
    x: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    backend: str,
    *,
    pdl: bool,
) -> LoraShrunk:
    assert c.lora_as is not None and c.lora_bs is not None
    on_torch = resolve_backend(backend, x.device) == "torch"
    if on_torch:
        inter = sgmv_torch.shrink_torch(x, c.lora_as, seg_indptr, seg_slots, list(c.ranks))
    else:
        from lorafleet.kernels import sgmv_launch

        pdl = pdl and sgmv_launch.pdl_enabled(x)
        inter = sgmv_launch.shrink(x, c.lora_as, seg_indptr, seg_slots, c.ranks, zero_fill=False, pdl=pdl)
    return LoraShrunk(
        inter, c.lora_bs, seg_indptr, seg_slots, c.ranks, c.scales, x.shape[0], x.dtype, on_torch
    )


def _expand(y: torch.Tensor, s: LoraShrunk, *, adjacent: bool) -> None:
    if s.on_torch:
        sgmv_torch.expand_torch(
            y,
            s.inter,
            s.lora_bs,
            s.seg_indptr,
            s.seg_slots,
            list(s.ranks),
            list(s.scales),
            _offsets(s.lora_bs),
        )
        return
    from lorafleet.kernels import sgmv_launch

    pdl = adjacent and sgmv_launch.pdl_enabled(y)
    sgmv_launch.expand(y, s.inter, s.lora_bs, s.seg_indptr, s.seg_slots, s.ranks, s.scales, pdl=pdl)


def shrink_slices(
    x: torch.Tensor,
    lora_a: torch.Tensor | Sequence[torch.Tensor],
    lora_b: torch.Tensor | Sequence[torch.Tensor],
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    ranks: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scales: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
) -> LoraShrunk:
    """The first half of ``add_lora_slices`` (same arguments but ``y``): ``x @ A_s[k, :r].T`` per
    row and slice, kept for ``expand_slices``. One launch on the Triton path, no host sync."""
    c = _validate(None, x, lora_a, lora_b, seg_indptr, seg_slots, ranks, scales)
    return _shrink(c, x, seg_indptr, seg_slots, backend, pdl=False)


def expand_slices(y: torch.Tensor, shrunk: LoraShrunk) -> None:
    """The second half of ``add_lora_slices``: ``y[i, off_s:off_s+w_s] += scales_s[k] *
    shrunk_s[i] @ B_s[k, :, :r].T`` in place. y: [T, sum(w_s)], T and dtype as the shrunk ``x``'s.

    Launched plainly (not as a programmatic dependent): the kernel just before it on the stream
    need not be the shrink."""
    if not isinstance(shrunk, LoraShrunk):
        fail("shrunk", f"expected the LoraShrunk of shrink_slices, got {type(shrunk).__name__}")
    _check_rows(y, "y", shrunk.inter.device, None)
    if y.dtype != shrunk.dtype:
        fail("y", f"dtype {y.dtype} differs from the shrunk x's {shrunk.dtype}")
    if y.shape[0] != shrunk.rows:
        fail("y", f"has {y.shape[0]} rows but the shrunk x had {shrunk.rows}")
    widths = [b.shape[1] for b in shrunk.lora_bs]
    if sum(widths) != y.shape[1]:
        fail("lora_b", f"output widths {widths} sum to {sum(widths)}, y has {y.shape[1]} columns")
    _expand(y, shrunk, adjacent=False)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slots: torch.Tensor,
    *,
    ranks: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """Apply a different LoRA adapter to each segment of a batch, in place.

    For each segment s with k = seg_slots[s] >= 0 and each row i of it:
    ``y[i] += scales[k] * ((x[i] @ lora_a[k, :ranks[k]].T) @ lora_b[k, :, :ranks[k]].T)``,
    the rank-sized intermediate accumulated in float32. Rows of segments with slot -1 are untouched.

    y:          [T, h_out] float16 / bfloat16 / float32, updated in place (last dim contiguous)
    x:          [T, h_in], same dtype and device as y (last dim contiguous)
    lora_a:     [n_slots, r_max, h_in] contiguous, one PEFT lora_A.weight per slot
    lora_b:     [n_slots, h_out, r_max] contiguous, one PEFT lora_B.weight per slot
    seg_indptr: [S+1] int32, 0 = seg_indptr[0] <= ... <= seg_indptr[S] = T (empty segments allowed)
    seg_slots:  [S] int32, slot per segment, -1 = no adapter
    ranks:      [n_slots] int32 true rank per slot (default r_max); entries past it are never read
    scales:     [n_slots] float32 per-slot scaling (default 1)
    backend:    "auto" (Triton on CUDA, torch otherwise), "triton" (CPU needs TRITON_INTERPRET=1), "torch"

    The Triton path never synchronises with the host and is CUDA-graph capturable. Metadata values
    (indptr order, slot range, ranks) are checked on CPU tensors; on CUDA only with
    ``LORAFLEET_DEBUG_CHECKS=1``, since that check reads them back.
    """
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    add_lora_slices(y, x, lora_a, lora_b, seg_indptr, seg_slots, ranks=ranks, scales=scales, backend=backend)
