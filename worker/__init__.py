"""lorafleet.worker: the per-GPU engine (model, paged KV cache, adapters, continuous batching).

The plain data types are imported eagerly; ``Engine`` and ``EngineConfig`` load on first use, so
torch-free code (the scheduler's policy, the CLI's argument parsing) can import
``lorafleet.worker.types`` without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafleet.worker.types import (
    EngineStats,
    FinishReason,
    GenerationOutput,
    Request,
    SamplingParams,
    SequenceState,
    TokenDelta,
)

if TYPE_CHECKING:
    from lorafleet.worker.engine import Engine
    from lorafleet.worker.engine_config import EngineConfig

_LAZY = {"Engine": "lorafleet.worker.engine", "EngineConfig": "lorafleet.worker.engine_config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorafleet.worker' has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "GenerationOutput",
    "Request",
    "SamplingParams",
    "SequenceState",
    "TokenDelta",
]
