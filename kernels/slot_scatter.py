"""Multi-tensor scatter: copy consecutive pieces of one flat buffer into many tensors in one launch.

An adapter upload lands in a staging buffer laid out as the concatenation of its destinations (every
(layer, projection) A and B stack of one LoRA slot, several hundred tensors for a 7B model). Copying
them one ``copy_`` at a time costs a launch each; ``slot_scatter`` copies them all in one Triton
launch driven by a device table of destination addresses, so an upload is one host-to-device copy
plus this kernel. The torch path (CPU, and the oracle in tests) does the same with plain copies.

A ``ScatterPlan`` is built once per set of destinations (the tensors must stay allocated as long as
the plan is used: the kernel writes to their raw addresses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lorafleet.kernels.dispatch import resolve_backend

# Elements per program: large enough that the ~450 pieces of a 7B adapter need few programs each,
# small enough that a piece's tail wastes little of its last program.
BLOCK = 4096


@dataclass(frozen=True)
class ScatterPlan:
    """Piece ``i`` of a flat source goes to ``dsts[i]``; the source is the dsts concatenated in order."""

    dsts: tuple[torch.Tensor, ...]  # contiguous, one dtype and device
    dst_addrs: torch.Tensor  # [n] int64 on the dsts' device: data_ptr of each destination
    src_offsets: torch.Tensor  # [n] int64 element offset of each piece in the source
    numels: torch.Tensor  # [n] int64 elements of each piece
    total: int  # source elements the plan reads
    max_numel: int


def make_plan(dsts: Sequence[torch.Tensor]) -> ScatterPlan:
    """A plan writing ``dsts`` from a source that holds them back to back (in this order)."""
    dsts = tuple(dsts)
    if not dsts:
        raise ValueError("dsts: expected at least one destination tensor")
    dtype, device = dsts[0].dtype, dsts[0].device
    for i, t in enumerate(dsts):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"dsts[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.device != device:
            raise ValueError(f"dsts[{i}]: {t.dtype} on {t.device}, expected {dtype} on {device}")
        if not t.is_contiguous():
            raise ValueError(f"dsts[{i}]: must be contiguous (the kernel writes it as one flat run)")
    numels = [t.numel() for t in dsts]
    offsets = [0]
    for n in numels[:-1]:
        offsets.append(offsets[-1] + n)
    table = torch.tensor([[t.data_ptr() for t in dsts], offsets, numels], dtype=torch.int64)
    table = table.to(device)  # one copy at build time; uploads then read it on the device
    return ScatterPlan(dsts, table[0], table[1], table[2], sum(numels), max(numels))


@triton.jit
def _slot_scatter_kernel(src_ptr, dst_addrs_ptr, src_offsets_ptr, numels_ptr, BLOCK: tl.constexpr):
    """Program (piece, chunk) copies elements [chunk*BLOCK, (chunk+1)*BLOCK) of one piece."""
    piece = tl.program_id(0)
    chunk = tl.program_id(1).to(tl.int64)
    numel = tl.load(numels_ptr + piece)
    if chunk * BLOCK < numel:  # the grid is sized for the largest piece
        src_off = tl.load(src_offsets_ptr + piece)
        dst = tl.load(dst_addrs_ptr + piece).to(tl.pointer_type(src_ptr.dtype.element_ty))
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        vals = tl.load(src_ptr + src_off + offs, mask=mask)
        tl.store(dst + offs, vals, mask=mask)


def slot_scatter(src: torch.Tensor, plan: ScatterPlan, *, backend: str = "auto", block: int = BLOCK) -> None:
    """``plan.dsts[i].view(-1)[:] = src[offset_i : offset_i + numel_i]`` for every piece, in one launch.

    backend: "auto" (Triton on CUDA, torch otherwise), "triton" (CPU needs TRITON_INTERPRET=1),
    "torch" (one ``copy_`` per piece).
    """
    if not isinstance(src, torch.Tensor) or src.dim() != 1 or not src.is_contiguous():
        raise ValueError("src: expected a contiguous 1-D tensor")
    dst0 = plan.dsts[0]
    if src.dtype != dst0.dtype or src.device != dst0.device:
        raise ValueError(f"src: {src.dtype} on {src.device}, the plan writes {dst0.dtype} on {dst0.device}")
    if src.numel() < plan.total:
        raise ValueError(f"src: {src.numel()} elements, the plan reads {plan.total}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"block: must be a power of two, got {block}")
    if resolve_backend(backend, src.device) == "torch":
        offset = 0
        for dst in plan.dsts:
            n = dst.numel()
            dst.view(-1).copy_(src[offset : offset + n])
            offset += n
        return
    grid = (len(plan.dsts), triton.cdiv(plan.max_numel, block))
    _slot_scatter_kernel[grid](src, plan.dst_addrs, plan.src_offsets, plan.numels, BLOCK=block)
