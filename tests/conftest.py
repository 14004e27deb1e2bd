"""Shared pytest setup: `gpu` tests skip cleanly where CUDA is absent."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides at decoration time whether to interpret, so this must precede any kernel import.
# Without CUDA the Triton kernels run under the interpreter (small shapes only); with CUDA they
# compile for real and the interpreter-only tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
