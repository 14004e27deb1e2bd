"""Triton kernels that fuse the decoder's elementwise steps: RMSNorm (with the residual add), RoPE
with the paged KV-cache write, and SiLU·up. ``fused_ops.py`` validates and launches them.

Every kernel is memory-bound, so each is written to touch every byte once: one program owns a row
(or a tile of heads / columns of a row), loads it as one power-of-two vector under a mask, computes
in float32 and stores once. Grids are sized from shapes alone and nothing is read back to the host,
so the launches are CUDA-graph capturable. Row offsets are int64: a KV cache of a large GPU can hold
more than 2**31 elements.

Rounding follows the torch path where that is free: values are rounded to the activation dtype at
the same points (``h.to(in_dtype)`` before the weight product, ``silu(gate)`` before ``* up``), and a
product or sum of two values of a 16-bit dtype computed in float32 then rounded once equals the
dtype's correctly rounded result (float32 has more than 2p + 2 bits). Only the reductions (order of
the sum of squares) and the transcendental functions can differ from torch by an ulp or so.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    x_stride,
    res_ptr,
    res_stride,
    w_ptr,
    out_ptr,
    out_stride,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
):
    """One row: [res <- res + x;] out <- w * (h * rsqrt(mean(h^2) + eps)).to(dtype), h = (res or x).

    With NUM_CHUNKS == 1 the row stays in registers between the statistics and the output (one read
    of each input). Wider rows (NUM_CHUNKS > 1) read the row twice; the second pass reads the residual
    this program just wrote, after a barrier that makes those writes visible to all its threads.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * out_stride
    res_row = res_ptr + row * res_stride
    dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = offs < H
        h = tl.load(x_row + offs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_row + offs, mask=mask, other=0.0)
            # Rounded to the activation dtype as `hidden + delta` is, then stored as the new residual.
            h = (h.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(res_row + offs, h, mask=mask)
        hf = h.to(tl.float32)
        inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = w * (hf * inv).to(dtype).to(tl.float32)
        tl.store(out_row + offs, y.to(dtype), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            mask = cols < H
            h = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_row + cols, mask=mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(res_row + cols, h, mask=mask)
            hf = h.to(tl.float32)
            acc += hf * hf
        inv = tl.rsqrt(tl.sum(acc, axis=0) / H + eps)
        tl.debug_barrier()
        src_row = res_row if HAS_RESIDUAL else x_row
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            mask = cols < H
            hf = tl.load(src_row + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            y = w * (hf * inv).to(dtype).to(tl.float32)
            tl.store(out_row + cols, y.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(gu_ptr, gu_stride, out_ptr, out_stride, inter, BLOCK: tl.constexpr):
    """Columns [pid1 * BLOCK, +BLOCK) of row pid0: out = silu(gate).to(dtype) * up."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gu_row = gu_ptr + row * gu_stride
    dtype = out_ptr.dtype.element_ty
    g = tl.load(gu_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # F.silu rounds its result to the activation dtype before the product; so do we.
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * u).to(dtype), mask=mask)


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr,
    qkv_stride,
    cos_ptr,
    cos_stride,
    sin_ptr,
    sin_stride,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    num_slots,
    NUM_Q_HEADS,
    NUM_KV_HEADS,
    HEAD_DIM: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
):
    """Heads [pid1 * HEAD_BLOCK, +HEAD_BLOCK) of the q|k|v heads of row pid0.

    The row's heads are taken as one list (Hq query heads, then Hkv key heads, then Hkv value
    heads: that is their column order in qkv), each as its two halves [HEAD_BLOCK, D/2]. Query
    heads are rotated and stored back in place, key heads rotated and stored to k_cache, value
    heads copied to v_cache; which store applies to a head is a mask, so one tile may mix kinds.
    k and v in qkv are left as they were.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    row = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    d = tl.arange(0, HALF_BLOCK)
    d_mask = d < HALF
    total = NUM_Q_HEADS + 2 * NUM_KV_HEADS
    tile_mask = (heads < total)[:, None] & d_mask[None, :]
    lo_ptr = qkv_ptr + row * qkv_stride + heads[:, None] * HEAD_DIM + d[None, :]
    x_lo = tl.load(lo_ptr, mask=tile_mask, other=0.0)
    x_hi = tl.load(lo_ptr + HALF, mask=tile_mask, other=0.0)
    cos_row = cos_ptr + row * cos_stride
    sin_row = sin_ptr + row * sin_stride
    c_lo = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c_hi = tl.load(cos_row + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s_lo = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s_hi = tl.load(sin_row + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    lo = x_lo.to(tl.float32)
    hi = x_hi.to(tl.float32)
    # x * cos + rotate_half(x) * sin with rotate_half(x) = [-hi, lo], in float32, rounded once.
    r_lo = lo * c_lo - hi * s_lo
    r_hi = hi * c_hi + lo * s_hi

    is_q = (heads < NUM_Q_HEADS)[:, None]
    q_mask = tile_mask & is_q
    qkv_dtype = qkv_ptr.dtype.element_ty
    tl.store(lo_ptr, r_lo.to(qkv_dtype), mask=q_mask)
    tl.store(lo_ptr + HALF, r_hi.to(qkv_dtype), mask=q_mask)

    # Broadcast to the head vector before comparing: the interpreter mishandles a scalar boolean
    # combined with a tensor mask, and the compiler folds the broadcast away.
    slot = tl.load(slot_ptr + row).to(tl.int64) + tl.zeros([HEAD_BLOCK], dtype=tl.int64)
    # A negative slot is a padded row; one past the cache is refused too rather than written.
    valid = (slot >= 0) & (slot < num_slots)
    kv_head = heads - NUM_Q_HEADS
    is_k = (kv_head >= 0) & (kv_head < NUM_KV_HEADS)
    v_head = kv_head - NUM_KV_HEADS
    is_v = (v_head >= 0) & (v_head < NUM_KV_HEADS)
    cache_head = tl.where(is_k, kv_head, v_head)
    cache_ptr_off = (slot * (NUM_KV_HEADS * HEAD_DIM) + cache_head * HEAD_DIM)[:, None] + d[None, :]
    k_mask = tile_mask & (is_k & valid)[:, None]
    v_mask = tile_mask & (is_v & valid)[:, None]
    k_dtype = k_cache_ptr.dtype.element_ty
    v_dtype = v_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + cache_ptr_off, r_lo.to(k_dtype), mask=k_mask)
    tl.store(k_cache_ptr + cache_ptr_off + HALF, r_hi.to(k_dtype), mask=k_mask)
    tl.store(v_cache_ptr + cache_ptr_off, x_lo.to(v_dtype), mask=v_mask)
    tl.store(v_cache_ptr + cache_ptr_off + HALF, x_hi.to(v_dtype), mask=v_mask)


# Launch sizing (module-level so tests can force the multi-chunk and multi-tile paths on tiny shapes).
RMS_MAX_BLOCK = 16384  # rows up to this width stay in registers (one read); wider rows loop
RMS_CHUNK = 4096
SILU_BLOCK = 1024
ROPE_TILE_ELEMS = 1024  # elements of one half-head tile per program (HEAD_BLOCK * D/2)


def _warps(elems: int) -> int:
    # About 16 elements per thread: two 16-byte vectors of a 16-bit dtype.
    return max(1, min(16, elems // 512))


def launch_rms_norm(x, residual, weight, out, eps: float) -> None:  # tensors validated by fused_ops; T >= 1
    T, H = x.shape
    block = triton.next_power_of_2(H)
    if block <= RMS_MAX_BLOCK:
        num_chunks = 1
    else:
        block = RMS_CHUNK
        num_chunks = triton.cdiv(H, block)
    has_res = residual is not None
    res = residual if has_res else x
    _rms_norm_kernel[(T,)](
        x,
        x.stride(0),
        res,
        res.stride(0),
        weight,
        out,
        out.stride(0),
        H,
        eps,
        HAS_RESIDUAL=has_res,
        BLOCK=block,
        NUM_CHUNKS=num_chunks,
        num_warps=_warps(block),
    )


def launch_silu_and_mul(gate_up, out) -> None:
    T, inter = out.shape
    block = min(triton.next_power_of_2(inter), SILU_BLOCK)
    grid = (T, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](
        gate_up, gate_up.stride(0), out, out.stride(0), inter, BLOCK=block, num_warps=_warps(block)
    )


def launch_rope_and_cache(
    qkv, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    T = qkv.shape[0]
    total = num_q_heads + 2 * num_kv_heads
    half_block = triton.next_power_of_2(head_dim // 2)
    head_block = min(triton.next_power_of_2(total), max(1, ROPE_TILE_ELEMS // half_block))
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    grid = (T, triton.cdiv(total, head_block))
    _rope_and_cache_kernel[grid](
        qkv,
        qkv.stride(0),
        cos,
        cos.stride(0),
        sin,
        sin.stride(0),
        k_cache,
        v_cache,
        slot_mapping,
        num_slots,
        num_q_heads,
        num_kv_heads,
        HEAD_DIM=head_dim,
        HALF_BLOCK=half_block,
        HEAD_BLOCK=head_block,
        num_warps=_warps(2 * head_block * half_block),
    )
