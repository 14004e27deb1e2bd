"""Fused elementwise operators of the decoder: ``rms_norm``, ``fused_add_rms_norm``,
``rope_and_cache`` and ``silu_and_mul``, each one Triton launch on the GPU.

Each validates its arguments before anything runs (a bad one raises ``ValueError("name: ...")``)
and dispatches on ``backend``: "auto" (Triton on CUDA, torch elsewhere), "triton" (CPU tensors need
``TRITON_INTERPRET=1``) or "torch". The torch path is the CPU path and the oracle: it computes
exactly what worker/layers.py and worker/rope.py compute (CPU float32 logits are compared with
transformers bit for bit), so its math is copied from there, not improved.

The Triton launches never read device values back to the host (CUDA-graph capturable). Slot values
of ``rope_and_cache`` are checked on CPU tensors, and on CUDA only with LORAFLEET_DEBUG_CHECKS=1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorafleet.kernels.dispatch import FLOAT_DTYPES, checks_values, fail, resolve_backend


def _check_tensor(t: object, name: str, dim: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(name, f"expected a torch.Tensor, got {type(t).__name__}")
    assert isinstance(t, torch.Tensor)
    if t.dim() != dim:
        fail(name, f"expected {dim}-D {what}, got shape {tuple(t.shape)}")
    return t


def _check_float(t: torch.Tensor, name: str, dtype: torch.dtype | None = None, ref: str = "") -> None:
    if t.dtype not in FLOAT_DTYPES:
        fail(name, f"dtype {t.dtype} is not float16, bfloat16 or float32")
    if dtype is not None and t.dtype != dtype:
        fail(name, f"dtype {t.dtype} differs from {ref}'s {dtype}")


def _check_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        fail(name, f"on {t.device}, expected {device}")


def _check_rows(t: torch.Tensor, name: str) -> None:
    # Rows may be strided views (a column slice of a fused output); elements within a row may not.
    if t.shape[0] > 0 and t.shape[1] > 1 and t.stride(1) != 1:
        fail(name, "the last dimension must be contiguous (stride 1)")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        fail("eps", f"expected a finite number >= 0, got {eps!r}")
    return float(eps)  # type: ignore[arg-type]


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_tensor(x, "x", 2, "[T, H]")
    _check_float(x, "x")
    if x.shape[1] == 0:
        fail("x", "hidden size H must be >= 1")
    _check_rows(x, "x")
    _check_tensor(weight, "weight", 1, "[H]")
    _check_float(weight, "weight", x.dtype, "x")
    _check_device(weight, "weight", x.device)
    if weight.shape[0] != x.shape[1]:
        fail("weight", f"has {weight.shape[0]} entries, x has hidden size {x.shape[1]}")
    if weight.stride(0) != 1:
        fail("weight", "must be contiguous")


# --- torch reference path (the CPU path; copies the worker's current math) ---


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """worker/layers.py RMSNorm.forward."""
    in_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(in_dtype)


def fused_add_rms_norm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    # `residual.add_(x)` rounds exactly as `hidden + delta` does.
    residual.add_(x)
    x.copy_(rms_norm_torch(residual, weight, eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_and_cache_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """worker/rope.py RotaryEmbedding.forward + worker/attention.py write_kv, padded rows skipped."""
    T = qkv.shape[0]
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(T, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(T, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(T, num_kv_heads, head_dim)
    c = cos[:, None, :]
    s = sin[:, None, :]
    q_rot = q * c + _rotate_half(q) * s
    k_rot = k * c + _rotate_half(k) * s
    q.copy_(q_rot)
    # Boolean selection of the real rows reads the mask back (a sync on CUDA); the GPU uses Triton.
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].to(torch.int64)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k_rot[valid].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[valid].to(v_cache.dtype))


def silu_and_mul_torch(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """worker/layers.py silu_and_mul (written into ``out`` when given: the same rounding)."""
    half = gate_up.shape[-1] // 2
    return torch.mul(F.silu(gate_up[:, :half]), gate_up[:, half:], out=out)


# --- public operators ---


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm with float32 statistics, as worker/layers.py RMSNorm computes it:
    ``out = weight * (xf * rsqrt(mean(xf**2, -1) + eps)).to(x.dtype)``, ``xf = x.float()``.

    x:       [T, H] float16 / bfloat16 / float32, last dim contiguous (rows may be strided)
    weight:  [H], x's dtype and device, contiguous
    eps:     finite float >= 0
    backend: "auto" | "triton" | "torch"
    returns: [T, H] contiguous, x's dtype (T == 0: an empty tensor, nothing launched)
    """
    _check_norm_args(x, weight)
    eps = _check_eps(eps)
    use = resolve_backend(backend, x.device)
    if use == "torch":
        return rms_norm_torch(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] > 0:
        from lorafleet.kernels import fused_triton

        fused_triton.launch_rms_norm(x, None, weight, out, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto"
) -> None:
    """Residual add and RMSNorm in place (vLLM's semantics), one launch:
    ``residual <- residual + x`` (rounded to x's dtype, as ``hidden + delta``), then
    ``x <- rms_norm(residual, weight, eps)``. Each row of x and residual is read once, written once.

    x:        [T, H] float16 / bfloat16 / float32, last dim contiguous; overwritten with the norm
    residual: [T, H] x's dtype and device, last dim contiguous, not x; overwritten with the sum
    weight:   [H] x's dtype, contiguous; eps: finite float >= 0; backend: as ``rms_norm``
    T == 0 is a no-op.
    """
    _check_norm_args(x, weight)
    _check_tensor(residual, "residual", 2, "[T, H]")
    _check_float(residual, "residual", x.dtype, "x")
    _check_device(residual, "residual", x.device)
    if residual.shape != x.shape:
        fail("residual", f"shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    _check_rows(residual, "residual")
    if x.shape[0] > 0 and residual.data_ptr() == x.data_ptr():
        fail("residual", "must not be the same memory as x")
    eps = _check_eps(eps)
    use = resolve_backend(backend, x.device)
    if x.shape[0] == 0:
        return
    if use == "torch":
        fused_add_rms_norm_torch(x, residual, weight, eps)
        return
    from lorafleet.kernels import fused_triton

    fused_triton.launch_rms_norm(x, residual, weight, x, eps)


def _check_rope_args(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(name, f"expected an integer >= 1, got {value!r}")
    if head_dim % 2:
        fail("head_dim", f"must be even for rotate_half, got {head_dim}")
    _check_tensor(qkv, "qkv", 2, "[T, (Hq + 2 * Hkv) * D]")
    _check_float(qkv, "qkv")
    device, T = qkv.device, qkv.shape[0]
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[1] != width:
        fail("qkv", f"has {qkv.shape[1]} columns, expected (Hq + 2 * Hkv) * D = {width}")
    _check_rows(qkv, "qkv")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_tensor(t, name, 2, "[T, D]")
        _check_float(t, name)
        _check_device(t, name, device)
        if tuple(t.shape) != (T, head_dim):
            fail(name, f"shape {tuple(t.shape)}, expected [T, D] = ({T}, {head_dim})")
        _check_rows(t, name)
    if sin.dtype != cos.dtype:
        fail("sin", f"dtype {sin.dtype} differs from cos's {cos.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(t, name, 4, "[num_blocks, block_size, Hkv, D]")
        _check_float(t, name)
        _check_device(t, name, device)
        if tuple(t.shape[2:]) != (num_kv_heads, head_dim):
            fail(
                name, f"shape {tuple(t.shape)}: last two dims must be (Hkv, D) = ({num_kv_heads}, {head_dim})"
            )
        if not t.is_contiguous():
            fail(name, "must be contiguous")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        fail(
            "v_cache",
            f"{v_cache.dtype} {tuple(v_cache.shape)} differs from k_cache's "
            f"{k_cache.dtype} {tuple(k_cache.shape)}",
        )
    _check_tensor(slot_mapping, "slot_mapping", 1, "[T]")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        fail("slot_mapping", f"dtype {slot_mapping.dtype} is not int32 or int64")
    _check_device(slot_mapping, "slot_mapping", device)
    if slot_mapping.shape[0] != T:
        fail("slot_mapping", f"has {slot_mapping.shape[0]} entries, qkv has {T} rows")
    if not slot_mapping.is_contiguous():
        fail("slot_mapping", "must be contiguous")
    if T and checks_values(device):
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        top = int(slot_mapping.max())
        if top >= num_slots:
            fail("slot_mapping", f"slot {top} is past the cache's {num_slots} slots")


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    backend: str = "auto",
) -> None:
    """Llama/NeoX rotary embedding of q and k, and the paged KV-cache write, in one launch.

    With q = qkv[:, :Hq*D], k = qkv[:, Hq*D:(Hq+Hkv)*D], v = qkv[:, (Hq+Hkv)*D:] seen as heads of D
    and ``rotate_half(x) = cat(-x[D/2:], x[:D/2])``:
      q <- q * cos + rotate_half(q) * sin                         (in place, in qkv)
      k_cache[s // bs, s % bs] <- k * cos + rotate_half(k) * sin  (s = slot_mapping[t], bs = block size)
      v_cache[s // bs, s % bs] <- v
    Rows with s < 0 are padding: nothing of theirs is written to the caches (q is still rotated).
    k and v in qkv are left unrotated and unchanged on both paths.

    qkv:          [T, (Hq + 2 * Hkv) * D] float16 / bfloat16 / float32, last dim contiguous
    cos, sin:     [T, D] one float dtype, last dim contiguous (worker/rope.py ``cos_sin``)
    k_cache, v_cache: [num_blocks, block_size, Hkv, D] contiguous, one float dtype (values cast to it)
    slot_mapping: [T] int32 or int64, contiguous; every slot < num_blocks * block_size
    num_q_heads (Hq), num_kv_heads (Hkv), head_dim (D, even): ints >= 1
    backend:      "auto" | "triton" | "torch"

    The torch path rounds q*cos, rotate_half(q)*sin and their sum to the activation dtype in turn
    (bit for bit worker/rope.py); the Triton path computes in float32 and rounds once, which is at
    least as accurate. T == 0 is a no-op.
    """
    _check_rope_args(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, head_dim)
    use = resolve_backend(backend, qkv.device)
    if qkv.shape[0] == 0:
        return
    args = (qkv, cos, sin, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, head_dim)
    if use == "torch":
        rope_and_cache_torch(*args)
        return
    from lorafleet.kernels import fused_triton

    fused_triton.launch_rope_and_cache(*args)


def silu_and_mul(
    gate_up: torch.Tensor, out: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """SwiGLU on a fused gate|up projection: ``out = silu(gate) * up`` with
    ``gate = gate_up[:, :I]``, ``up = gate_up[:, I:]``, ``silu(g) = g * sigmoid(g)`` rounded to the
    activation dtype before the product (as worker/layers.py silu_and_mul).

    gate_up: [T, 2 * I] float16 / bfloat16 / float32, last dim contiguous
    out:     optional [T, I], gate_up's dtype and device, last dim contiguous, not overlapping gate_up
    backend: "auto" | "triton" | "torch"
    returns: out (a new contiguous [T, I] tensor when not given); T == 0 launches nothing
    """
    _check_tensor(gate_up, "gate_up", 2, "[T, 2 * I]")
    _check_float(gate_up, "gate_up")
    if gate_up.shape[1] % 2 or gate_up.shape[1] == 0:
        fail("gate_up", f"needs an even, non-zero number of columns, got {gate_up.shape[1]}")
    _check_rows(gate_up, "gate_up")
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is not None:
        _check_tensor(out, "out", 2, "[T, I]")
        _check_float(out, "out", gate_up.dtype, "gate_up")
        _check_device(out, "out", gate_up.device)
        if tuple(out.shape) != (T, inter):
            fail("out", f"shape {tuple(out.shape)}, expected [T, I] = ({T}, {inter})")
        _check_rows(out, "out")
    use = resolve_backend(backend, gate_up.device)
    if use == "torch":
        return silu_and_mul_torch(gate_up, out)
    if out is None:
        out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    if T > 0:
        from lorafleet.kernels import fused_triton

        fused_triton.launch_silu_and_mul(gate_up, out)
    return out
