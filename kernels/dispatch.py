"""What every public kernel wrapper shares: argument errors, the backend choice, the debug switch.

A wrapper validates its arguments before anything is launched and raises ``ValueError("name: what
is wrong")`` naming the argument; ``backend`` is "auto" (Triton on CUDA, torch elsewhere), "triton"
(CPU tensors need the interpreter, ``TRITON_INTERPRET=1``) or "torch".
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")
# Checking metadata *values* on CUDA reads them back (a host sync, and no CUDA-graph capture), so
# there it runs only when asked for.
DEBUG_CHECKS = os.environ.get("LORAFLEET_DEBUG_CHECKS", "0") == "1"


def fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: "triton" or "torch"."""
    if backend not in BACKENDS:
        fail("backend", f"{backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        fail("backend", "triton on CPU tensors needs TRITON_INTERPRET=1 (or use backend='torch')")
    return backend


def checks_values(device: torch.device) -> bool:
    """Whether metadata values are checked on ``device`` (always off CUDA)."""
    return device.type != "cuda" or DEBUG_CHECKS
