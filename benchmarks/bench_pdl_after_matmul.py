"""GPU probe: does launching an elementwise Triton kernel as the programmatic dependent of a cuBLAS
matmul shorten the pair?

The decode step is a chain of cuBLAS matmuls and small Triton kernels (norms, RoPE, SiLU, SGMV);
each small kernel waits for the matmul before it, then pays its own launch and ramp-up. With
programmatic dependent launch (Hopper), a kernel may be scheduled before its predecessor ends and
wait in ``gdc_wait`` for its results; whether that helps after a cuBLAS kernel (which may or may not
signal its dependents early) is what this measures, for decode-sized matmuls. Each variant is a
CUDA graph of REPS (matmul, kernel) pairs; µs per pair, best of 5 replays:

- ``matmul``: the matmul alone;
- ``plain``: matmul, then a row-wise RMSNorm-like kernel launched normally;
- ``pdl``: the same kernel launched with ``launch_pdl=True``, waiting in ``gdc_wait`` before it
  reads the matmul's output.

    python3 benchmarks/bench_pdl_after_matmul.py [--batches 16,64] [--reps 200]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

H = 4096


@triton.jit
def _norm_kernel(y_ptr, out_ptr, H: tl.constexpr, WAIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if WAIT:
        tl.extra.cuda.gdc_wait()
    offs = tl.arange(0, H)
    v = tl.load(y_ptr + row * H + offs).to(tl.float32)
    inv = tl.rsqrt(tl.sum(v * v, axis=0) / H + 1e-5)
    tl.store(out_ptr + row * H + offs, (v * inv).to(out_ptr.dtype.element_ty))


def time_graph(step, reps: int) -> float:
    """Microseconds per ``step`` in a CUDA graph of ``reps`` steps (best of 5 replays)."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / reps)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print(
            "bench_pdl_after_matmul.py needs a CUDA GPU with programmatic dependent launch (sm90+)",
            file=sys.stderr,
        )
        return 2
    w = (torch.randn(H, H, device="cuda") / 64).to(torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}; µs per (matmul [T, {H}] x [{H}, {H}], kernel) pair")
    print("| T | matmul | matmul + kernel | matmul + kernel (PDL) | PDL saves |")
    print("|---:|---:|---:|---:|---:|")
    for T in [int(t) for t in args.batches.split(",")]:
        x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
        y = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(y)

        def matmul(x=x, y=y) -> None:
            torch.matmul(x, w.T, out=y)

        def plain(T=T, y=y, out=out) -> None:
            matmul()
            _norm_kernel[(T,)](y, out, H=H, WAIT=False, num_warps=8)

        def pdl(T=T, y=y, out=out) -> None:
            matmul()
            _norm_kernel[(T,)](y, out, H=H, WAIT=True, num_warps=8, launch_pdl=True)

        plain()
        ref = out.clone()
        pdl()
        torch.cuda.synchronize()
        if not torch.equal(out, ref):
            print(f"T={T}: the PDL launch gave different results", file=sys.stderr)
            return 1
        t_mm, t_plain, t_pdl = (time_graph(f, args.reps) for f in (matmul, plain, pdl))
        print(f"| {T} | {t_mm:.1f} | {t_plain:.1f} | {t_pdl:.1f} | {t_plain - t_pdl:+.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
