"""convert.py: protobuf <-> dataclasses, and the validation that answers INVALID_ARGUMENT."""

from __future__ import annotations

import dataclasses

import pytest

from lorafleet.proto.lorafleet.v1 import serving_pb2 as pb
from lorafleet.scheduler.status import ClusterStatus, FleetCounters, WorkerStatus
from lorafleet.serving import convert
from lorafleet.serving.api_types import GenerateChunk, GenerateResult, ModelView, Usage
from lorafleet.worker.types import FinishReason, SamplingParams, TokenDelta


def _request(msg: pb.GenerateRequest, **kw):
    return convert.request_from_proto(
        msg, encode=lambda s: [ord(c) for c in s], request_id="r1", arrival_time=1.0, **kw
    )


def test_unset_sampling_fields_take_engine_defaults() -> None:
    assert convert.sampling_from_proto(pb.SamplingParams()) == SamplingParams()


def test_sampling_round_trip() -> None:
    params = SamplingParams(
        max_new_tokens=7,
        temperature=0.0,
        top_k=5,
        top_p=0.5,
        seed=11,
        stop_token_ids=(3, 4),
        stop=("x",),
        ignore_eos=True,
        logprobs=True,
        top_logprobs=4,
    )
    assert convert.sampling_from_proto(convert.sampling_to_proto(params)) == params
    unseeded = dataclasses.replace(params, seed=None)
    assert convert.sampling_from_proto(convert.sampling_to_proto(unseeded)).seed is None


def test_explicit_zero_is_not_the_default() -> None:
    # temperature 0 (greedy) must survive; max_new_tokens 0 must be rejected, not defaulted.
    assert convert.sampling_from_proto(pb.SamplingParams(temperature=0.0)).temperature == 0.0
    with pytest.raises(ValueError, match="max_new_tokens"):
        convert.sampling_from_proto(pb.SamplingParams(max_new_tokens=0))


def test_mapping_sampling_is_passed_unvalidated_and_unknown_keys_fail() -> None:
    msg = convert.sampling_to_proto({"max_new_tokens": -5, "top_p": 3.0})
    assert msg.max_new_tokens == -5 and msg.top_p == 3.0
    with pytest.raises(ValueError, match="temprature"):
        convert.sampling_to_proto({"temprature": 1.0})


@pytest.mark.parametrize(
    ("msg", "kw", "needle"),
    [
        (pb.GenerateRequest(), {}, "empty"),
        (pb.GenerateRequest(text=""), {}, "empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[])), {}, "empty"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 500])), {"vocab_size": 384}, "[0, 384)"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), {"vocab_size": 384}, "[0, 384)"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 8)), {"max_context_tokens": 8}, "context"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=0.0)), {}, "top_p"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_new_tokens=-2)), {}, "max_new_tokens"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(seed=-1)), {}, "seed"),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop=[""])), {}, "stop"),
        (
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(stop_token_ids=[-4])),
            {},
            "stop_token_ids",
        ),
        (pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_logprobs=2)), {}, "needs logprobs"),
        (
            pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(logprobs=True, top_logprobs=21)),
            {},
            "top_logprobs must be an integer in [0, 20]",
        ),
    ],
)
def test_bad_requests_raise_value_error_naming_the_field(msg, kw, needle) -> None:
    with pytest.raises(ValueError) as info:
        _request(msg, **kw)
    assert needle in str(info.value)


def test_request_from_text_and_ids() -> None:
    req = _request(
        pb.GenerateRequest(text="ab", adapter="alice", sampling=pb.SamplingParams(max_new_tokens=3))
    )
    assert req.prompt_token_ids == (97, 98)
    assert req.adapter == "alice"
    assert req.sampling.max_new_tokens == 3
    assert req.request_id == "r1"
    req = _request(
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3])), vocab_size=4, max_context_tokens=4
    )
    assert req.prompt_token_ids == (1, 2, 3) and req.adapter is None


def test_client_request_builder() -> None:
    msg = convert.generate_request_to_proto([1, 2], adapter=None, request_id="x")
    assert msg.WhichOneof("prompt") == "token_ids" and list(msg.token_ids.ids) == [1, 2]
    assert msg.adapter == "" and msg.request_id == "x"
    msg = convert.generate_request_to_proto("hello", adapter="a", sampling=SamplingParams(temperature=0.0))
    assert msg.text == "hello" and msg.sampling.HasField("temperature")


def test_delta_and_chunk_round_trip() -> None:
    delta = TokenDelta("r", (5, 6), new_text="ab", new_logprobs=(-0.5, -1.0), finish_reason=FinishReason.STOP)
    usage = Usage(prompt_tokens=3, generated_tokens=2, time_to_first_token_s=0.25, total_time_s=0.5)
    chunk = convert.chunk_from_proto(convert.delta_to_proto(delta, usage))
    assert chunk == GenerateChunk("r", (5, 6), "ab", (-0.5, -1.0), FinishReason.STOP, usage)
    mid = convert.chunk_from_proto(convert.delta_to_proto(TokenDelta("r", (1,), new_text="z")))
    assert mid.finish_reason is None and mid.usage is None and mid.logprobs is None
    assert GenerateResult.from_chunks([mid, chunk]).token_ids == (1, 5, 6)
    with pytest.raises(ValueError, match="final message"):
        GenerateResult.from_chunks([mid])
    with pytest.raises(ValueError, match="ERROR"):
        convert.delta_to_proto(TokenDelta("r", (), finish_reason=FinishReason.ERROR, error="x"))


def test_top_logprobs_round_trip() -> None:
    tops = (((5, -0.25), (9, -1.5)), ((6, -0.5), (2, -0.75)))
    delta = TokenDelta("r", (5, 6), new_logprobs=(-0.25, -0.5), new_top_logprobs=tops)
    chunk = convert.chunk_from_proto(convert.delta_to_proto(delta))
    assert chunk.top_logprobs == tops and chunk.logprobs == (-0.25, -0.5)
    plain = convert.chunk_from_proto(convert.delta_to_proto(TokenDelta("r", (1,), new_logprobs=(-1.0,))))
    assert plain.top_logprobs is None
    usage = Usage(1, 3, 0.1, 0.2)
    final = convert.chunk_from_proto(
        convert.delta_to_proto(
            TokenDelta(
                "r",
                (7,),
                new_logprobs=(-2.0,),
                new_top_logprobs=(((7, -2.0),),),
                finish_reason=FinishReason.LENGTH,
            ),
            usage,
        )
    )
    result = GenerateResult.from_chunks([chunk, final])
    assert result.top_logprobs == (*tops, ((7, -2.0),))


def test_proto_counters_mirror_fleet_counters() -> None:
    proto_fields = [f.name for f in pb.ClusterCounters.DESCRIPTOR.fields]
    assert proto_fields == [f.name for f in dataclasses.fields(FleetCounters)]
    worker_fields = {f.name for f in pb.WorkerStatus.DESCRIPTOR.fields}
    assert worker_fields == {f.name for f in dataclasses.fields(WorkerStatus)}


def test_status_round_trip() -> None:
    counters = FleetCounters(**{f.name: i + 1 for i, f in enumerate(dataclasses.fields(FleetCounters))})
    counters = dataclasses.replace(counters, adapter_load_seconds_sum=1.5)
    workers = (
        WorkerStatus("w0", "active", 2, 8, 10, 20, ("b", "a"), pid=4242),
        WorkerStatus("w1", "starting", 0, 0, 0, 0, (), last_error="no GPU"),
    )
    model = ModelView("tiny", 384, 512)
    view = convert.cluster_from_proto(convert.status_to_proto(ClusterStatus(workers, 3, counters), model))
    assert view.counters == counters
    assert view.model == model
    assert view.queue_len == 3
    assert view.workers[0].resident_adapters == ("a", "b")
    assert view.workers[1].last_error == "no GPU" and view.workers[0].last_error is None
    assert (view.workers[0].pid, view.workers[1].pid) == (4242, 0)
    assert view.free_kv_blocks == 10 and view.total_kv_blocks == 20 and view.num_busy_workers == 1


def test_adapters_round_trip() -> None:
    adapters = {"b": "/x/b", "a": "/x/a"}
    msg = convert.adapters_to_proto(adapters)
    assert [a.name for a in msg.adapters] == ["a", "b"]
    assert convert.adapters_from_proto(msg) == adapters
