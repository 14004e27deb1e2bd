"""The one place where protobuf messages become lorafleet dataclasses and back.

Server side: GenerateRequest -> Request (ValueError on bad input, which the server answers with
INVALID_ARGUMENT), TokenDelta -> GenerateResponse, the fleet's status -> ClusterStatus.
Client side: GenerateResponse -> GenerateChunk, ClusterStatus -> ClusterView, and the requests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lorafleet.proto.lorafleet.v1 import serving_pb2 as pb
from lorafleet.scheduler.status import ClusterStatus, FleetCounters, WorkerStatus
from lorafleet.serving import validation
from lorafleet.serving.api_types import ClusterView, GenerateChunk, ModelView, Usage
from lorafleet.worker.types import FinishReason, Request, SamplingParams, TokenDelta

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
_PLAIN_SAMPLING = ("stop_token_ids", "stop", "ignore_eos", "logprobs", "top_logprobs")


# ------------------------------------------------------------------ sampling


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' defaults; FieldError (a ValueError) names a bad one."""
    values: dict[str, Any] = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}
    values["stop_token_ids"] = tuple(msg.stop_token_ids)
    values["stop"] = tuple(msg.stop)
    values["ignore_eos"] = msg.ignore_eos
    values["logprobs"] = msg.logprobs
    values["top_logprobs"] = msg.top_logprobs
    return validation.sampling_params(values)


def sampling_to_proto(sampling: SamplingParams | Mapping[str, Any] | None) -> pb.SamplingParams:
    """A SamplingParams sets every field; a mapping sets only its keys, unvalidated (the server checks)."""
    if sampling is None:
        return pb.SamplingParams()
    if isinstance(sampling, SamplingParams):
        values: dict[str, Any] = {
            name: getattr(sampling, name) for name in _OPTIONAL_SAMPLING + _PLAIN_SAMPLING
        }
        if values["seed"] is None:
            del values["seed"]
    else:
        unknown = sorted(set(sampling) - set(_OPTIONAL_SAMPLING + _PLAIN_SAMPLING))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        values = {k: v for k, v in sampling.items() if v is not None}
    msg = pb.SamplingParams()
    for name, value in values.items():
        try:  # one field at a time, so that an out-of-range value names its field
            if name in ("stop", "stop_token_ids"):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"sampling parameter {name}: {exc}") from exc
    return msg


# ------------------------------------------------------------------ generate


def generate_request_to_proto(
    prompt: str | Sequence[int],
    *,
    adapter: str | None = None,
    sampling: SamplingParams | Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(
        adapter=adapter or "", sampling=sampling_to_proto(sampling), request_id=request_id or ""
    )
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        try:
            msg.token_ids.ids.extend(int(t) for t in prompt)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"prompt token ids: {exc} (token ids are 32-bit integers)") from exc
    return msg


def request_from_proto(
    msg: pb.GenerateRequest,
    *,
    encode: Callable[[str], Sequence[int]],
    request_id: str,
    arrival_time: float,
    vocab_size: int | None = None,
    max_context_tokens: int | None = None,
) -> Request:
    """Build the engine's Request; ValueError (with a message for the caller) on any bad field.

    The checks are validation.py's, the same the HTTP API runs."""
    kind = msg.WhichOneof("prompt")
    if kind == "text":
        prompt: str | tuple[int, ...] = msg.text
    elif kind == "token_ids":
        prompt = tuple(msg.token_ids.ids)
    else:
        raise validation.FieldError("prompt", "the prompt is empty: set either text or token_ids")
    token_ids = validation.prompt_token_ids(
        prompt, encode=encode, vocab_size=vocab_size, max_context_tokens=max_context_tokens
    )
    sampling = sampling_from_proto(msg.sampling)
    validation.check_stop_token_ids(sampling, vocab_size)
    return validation.build_request(
        request_id=request_id,
        token_ids=token_ids,
        adapter=msg.adapter or None,
        sampling=sampling,
        arrival_time=arrival_time,
    )


def delta_to_proto(delta: TokenDelta, usage: Usage | None = None) -> pb.GenerateResponse:
    """A delta with finish reason ERROR never reaches here: the server turns it into a status."""
    msg = pb.GenerateResponse(
        request_id=delta.request_id, token_ids=list(delta.new_token_ids), text=delta.new_text
    )
    if delta.new_logprobs is not None:
        msg.logprobs.extend(delta.new_logprobs)
    for top in delta.new_top_logprobs or ():
        msg.top_logprobs.add(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top])
    if delta.finish_reason is not None:
        if delta.finish_reason not in _FINISH_TO_PB:
            raise ValueError(f"finish reason {delta.finish_reason} has no protobuf value")
        msg.finish_reason = _FINISH_TO_PB[delta.finish_reason]
    if usage is not None:
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=usage.prompt_tokens,
                generated_tokens=usage.generated_tokens,
                time_to_first_token_s=usage.time_to_first_token_s,
                total_time_s=usage.total_time_s,
            )
        )
    return msg


def chunk_from_proto(msg: pb.GenerateResponse, *, want_logprobs: bool = False) -> GenerateChunk:
    finish = _FINISH_FROM_PB.get(msg.finish_reason) if msg.finish_reason else None
    if msg.finish_reason and finish is None:
        raise ValueError(f"unknown finish reason {msg.finish_reason} from the server")
    usage = None
    if msg.HasField("usage"):
        usage = Usage(
            prompt_tokens=msg.usage.prompt_tokens,
            generated_tokens=msg.usage.generated_tokens,
            time_to_first_token_s=msg.usage.time_to_first_token_s,
            total_time_s=msg.usage.total_time_s,
        )
    return GenerateChunk(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        logprobs=tuple(msg.logprobs) if (want_logprobs or msg.logprobs) else None,
        finish_reason=finish,
        usage=usage,
        top_logprobs=(
            tuple(tuple(zip(t.token_ids, t.logprobs)) for t in msg.top_logprobs) if msg.top_logprobs else None
        ),
    )


# ------------------------------------------------------------------ adapters


def adapters_to_proto(adapters: Mapping[str, str]) -> pb.ListAdaptersResponse:
    return pb.ListAdaptersResponse(
        adapters=[pb.Adapter(name=name, path=str(path)) for name, path in sorted(adapters.items())]
    )


def adapters_from_proto(msg: pb.ListAdaptersResponse) -> dict[str, str]:
    return {a.name: a.path for a in msg.adapters}


# ------------------------------------------------------------------ cluster status

# One list for both directions, so a field added to WorkerStatus is converted both ways or neither.
# resident_adapters and last_error are not here: their type or their "none" differs between forms.
_SAME_WORKER_FIELDS = (
    "worker_id",
    "state",
    "num_running",
    "max_batch_size",
    "free_kv_blocks",
    "total_kv_blocks",
    "pid",
)


def _same_worker_fields(worker: WorkerStatus | pb.WorkerStatus) -> dict[str, Any]:
    """The fields of a worker status (dataclass or message) that both forms hold as is, by name."""
    return {name: getattr(worker, name) for name in _SAME_WORKER_FIELDS}


def status_to_proto(status: ClusterStatus, model: ModelView) -> pb.ClusterStatus:
    msg = pb.ClusterStatus(
        queue_len=status.queue_len,
        counters=pb.ClusterCounters(**dataclasses.asdict(status.counters)),
        model=pb.ModelInfo(
            name=model.name, vocab_size=model.vocab_size, max_context_tokens=model.max_context_tokens
        ),
    )
    for w in status.workers:
        msg.workers.append(
            pb.WorkerStatus(
                **_same_worker_fields(w),
                resident_adapters=sorted(w.resident_adapters),
                last_error=w.last_error or "",
            )
        )
    return msg


def cluster_from_proto(msg: pb.ClusterStatus) -> ClusterView:
    counters = {f.name: getattr(msg.counters, f.name) for f in dataclasses.fields(FleetCounters)}
    return ClusterView(
        workers=tuple(
            WorkerStatus(
                **_same_worker_fields(w),
                resident_adapters=tuple(w.resident_adapters),
                last_error=w.last_error or None,
            )
            for w in msg.workers
        ),
        queue_len=msg.queue_len,
        counters=FleetCounters(**counters),
        model=ModelView(
            name=msg.model.name,
            vocab_size=msg.model.vocab_size,
            max_context_tokens=msg.model.max_context_tokens,
        ),
    )
