"""Plain, torch-free data types that cross the engine's boundary.

The cluster runtime pickles these between Ray actors and the gRPC layer converts protobuf to and
from them, so they hold only Python scalars, tuples and bytes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# The most alternatives a request may ask for per token (OpenAI's limit for top_logprobs).
MAX_TOP_LOGPROBS = 20

# One token's most likely alternatives, best first: (token id, logprob) pairs.
TopLogprobs = tuple[tuple[int, float], ...]


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed; TokenDelta.error says why


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding options (the same fields the gRPC API exposes).

    temperature == 0 means greedy. top_k == 0 and top_p == 1 disable those filters. A seeded request
    draws token i from a generator seeded by (seed, i), so its random stream survives export/import.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    # With logprobs: also the top_logprobs most likely tokens of each step and their logprobs (the
    # unmodified distribution's, like logprobs), e.g. to see where a greedy choice was a near-tie.
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(str(s) for s in self.stop))
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        top = self.top_logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs (the chosen tokens' logprobs) set too")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    """One generation request as the engine and the scheduler see it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    adapter: str | None = None  # None = base model
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        if len(self.prompt_token_ids) == 0:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))


@dataclass(frozen=True)
class SequenceState:
    """Everything needed to resume a sequence elsewhere by recomputing its KV cache.

    Produced by ``Engine.export`` and consumed by ``Engine.import_``; the resumed sequence continues
    exactly where it stopped: no token lost or repeated, and a seeded sampled request continues its
    random stream because draws are keyed by (seed, index of the generated token).
    """

    request: Request
    output_token_ids: tuple[int, ...] = ()
    output_logprobs: tuple[float, ...] | None = None
    # Text already delivered to the caller, so stop strings spanning the migration still match.
    output_text: str = ""
    output_top_logprobs: tuple[TopLogprobs, ...] | None = None  # with sampling.top_logprobs


@dataclass(frozen=True)
class TokenDelta:
    """What one engine step produced for one sequence: new tokens and, at the end, why it ended."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str = ""
    new_logprobs: tuple[float, ...] | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    new_top_logprobs: tuple[TopLogprobs, ...] | None = None  # one per new token, with top_logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationOutput:
    """The finished result of one request (offline API)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    logprobs: tuple[float, ...] | None = None
    error: str | None = None
    top_logprobs: tuple[TopLogprobs, ...] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A load snapshot of one engine, cheap to build every step."""

    num_running: int
    num_waiting: int
    max_batch_size: int
    num_free_kv_blocks: int
    num_total_kv_blocks: int
    block_size: int
    resident_adapters: tuple[str, ...]
    running_request_ids: tuple[str, ...] = ()
    num_preemptions: int = 0
    num_adapter_loads: int = 0
    adapter_cache_hits: int = 0
    adapter_cache_misses: int = 0
    adapter_load_seconds: tuple[float, ...] = ()  # load times since the last snapshot
