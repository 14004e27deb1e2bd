"""Plain inputs and outputs of the scheduling policies (no torch, no Ray: the simulator uses them).

Inputs: `PendingRequest` (a request waiting for a worker) and one `WorkerSnapshot` per worker.
Outputs: decision dataclasses that the runtime (or the simulator) carries out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing lorafleet.worker at run time would load torch via its __init__
    from lorafleet.worker.types import Request


class WorkerState(str, enum.Enum):
    STARTING = "starting"  # asked for, not ready yet (model loading or waiting for a GPU)
    ACTIVE = "active"  # takes new requests
    DRAINING = "draining"  # takes nothing new; released once empty
    STOPPED = "stopped"


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def placeable_free_blocks(engine_free_blocks: int, pending_tokens: Iterable[int], block_size: int) -> int:
    """The free KV blocks the policies see: the engine's, less the blocks of the sequences it holds
    no KV for yet (just sent, or waiting inside the engine), so a pass does not promise them twice."""
    return engine_free_blocks - sum(blocks_for(n, block_size) for n in pending_tokens)


@dataclass(frozen=True)
class PendingRequest:
    """A request waiting for placement: new, or resumed after eviction, migration failure or a fault.

    For a resumed request `prompt_len` is the whole context to recompute (prompt plus the tokens
    already delivered) and `max_new_tokens` the tokens still to generate.
    """

    request_id: str
    adapter: str | None
    prompt_len: int
    max_new_tokens: int
    arrival_time: float

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"request {self.request_id}: prompt_len must be >= 1, got {self.prompt_len}")
        if self.max_new_tokens < 0:
            raise ValueError(
                f"request {self.request_id}: max_new_tokens must be >= 0, got {self.max_new_tokens}"
            )

    @classmethod
    def from_request(cls, request: Request, num_generated: int = 0) -> PendingRequest:
        return cls(
            request_id=request.request_id,
            adapter=request.adapter,
            prompt_len=len(request.prompt_token_ids) + num_generated,
            max_new_tokens=max(0, request.sampling.max_new_tokens - num_generated),
            arrival_time=request.arrival_time,
        )


@dataclass(frozen=True)
class RunningSeq:
    """One sequence running on a worker."""

    request_id: str
    adapter: str | None
    num_tokens: int  # context so far: prompt + generated
    started_at: float  # when it was placed on this worker
    remaining_tokens: int | None = None  # tokens it may still generate, if known


@dataclass(frozen=True)
class WorkerSnapshot:
    """The load of one worker as the scheduler last saw it."""

    worker_id: str
    state: WorkerState
    running: tuple[RunningSeq, ...]
    max_batch_size: int
    free_kv_blocks: int
    total_kv_blocks: int
    block_size: int
    resident_adapters: frozenset[str] = frozenset()
    idle_since: float | None = None  # when it last became empty; None while it runs sequences

    @property
    def num_running(self) -> int:
        return len(self.running)

    @classmethod
    def from_load(
        cls,
        worker_id: str,
        state: WorkerState,
        running: tuple[RunningSeq, ...],
        *,
        pending_tokens: Iterable[int],
        engine_free_blocks: int,
        max_batch_size: int,
        total_kv_blocks: int,
        block_size: int,
        resident_adapters: frozenset[str],
        idle_since: float | None,
    ) -> WorkerSnapshot:
        """The one way both the runtime and the simulator describe a worker to the policies.

        `running` is every sequence the scheduler has given the worker (authoritative for the batch);
        `pending_tokens` are the contexts of those the engine holds no KV for yet, whose blocks
        `placeable_free_blocks` takes off the engine's free count.
        """
        return cls(
            worker_id=worker_id,
            state=state,
            running=running,
            max_batch_size=max_batch_size,
            free_kv_blocks=placeable_free_blocks(engine_free_blocks, pending_tokens, block_size),
            total_kv_blocks=total_kv_blocks,
            block_size=block_size,
            resident_adapters=resident_adapters,
            idle_since=idle_since,
        )


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Place:
    request_id: str
    worker_id: str


@dataclass(frozen=True)
class Queue:
    """The head of the queue fits nowhere now; it and everything behind it wait (FCFS)."""

    request_id: str
    reason: str


@dataclass(frozen=True)
class Reject:
    """The request can never run on this fleet (e.g. it needs more KV blocks than a worker has)."""

    request_id: str
    reason: str


@dataclass(frozen=True)
class StartWorker:
    reason: str


@dataclass(frozen=True)
class ReleaseWorker:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class Migrate:
    request_id: str
    source: str
    target: str


@dataclass(frozen=True)
class Evict:
    """Take the sequence off its worker and place it again like a new request (KV pressure)."""

    request_id: str
    worker_id: str
    reason: str


Decision = Place | Queue | Reject | StartWorker | ReleaseWorker | Migrate | Evict
