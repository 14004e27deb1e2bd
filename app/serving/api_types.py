"""Plain dataclasses a client gets back from the gRPC API (protobuf stays inside convert.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.scheduler.status import FleetCounters, WorkerStatus
from lorafleet.worker.types import FinishReason, TopLogprobs


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    total_time_s: float


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed message: tokens new since the previous chunk; the last one has finish_reason and usage."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    top_logprobs: tuple[TopLogprobs, ...] | None = None  # one per token, with top_logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerateResult:
    """A whole stream gathered: what `Client.generate` returns."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[TopLogprobs, ...] | None = None

    @classmethod
    def from_chunks(cls, chunks: list[GenerateChunk]) -> GenerateResult:
        if not chunks or chunks[-1].finish_reason is None or chunks[-1].usage is None:
            raise ValueError("the stream ended without its final message (finish reason and usage)")
        with_logprobs = [c.logprobs for c in chunks if c.logprobs is not None]
        with_tops = [c.top_logprobs for c in chunks if c.top_logprobs is not None]
        return cls(
            request_id=chunks[-1].request_id,
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            text="".join(c.text for c in chunks),
            finish_reason=chunks[-1].finish_reason,
            usage=chunks[-1].usage,
            logprobs=tuple(lp for lps in with_logprobs for lp in lps) if with_logprobs else None,
            top_logprobs=tuple(t for tops in with_tops for t in tops) if with_tops else None,
        )


@dataclass(frozen=True)
class ModelView:
    """The base model a server serves (name = its folder's name)."""

    name: str
    vocab_size: int
    max_context_tokens: int


@dataclass(frozen=True)
class ClusterView:
    """What GetClusterStatus answers: the fleet's status (scheduler dataclasses) plus the model."""

    workers: tuple[WorkerStatus, ...]
    queue_len: int
    counters: FleetCounters
    model: ModelView

    @property
    def num_busy_workers(self) -> int:
        return sum(1 for w in self.workers if w.num_running > 0)

    @property
    def free_kv_blocks(self) -> int:
        return sum(w.free_kv_blocks for w in self.workers)

    @property
    def total_kv_blocks(self) -> int:
        return sum(w.total_kv_blocks for w in self.workers)

    def workers_in(self, state: str) -> int:
        return sum(1 for w in self.workers if w.state == state)
