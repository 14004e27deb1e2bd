"""The gRPC servicer over a fake fleet: streaming, every error status, cancellation, health, reflection."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorafleet.client.grpc_client import ApiError, AsyncClient, Client
from lorafleet.worker.types import FinishReason, SamplingParams

# The fake server's model (tests/api/conftest.py); checked in test_fake_model_limits.
VOCAB = 384
MAX_CONTEXT = 64


def _wait_until(predicate, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_fake_model_limits(fake_server) -> None:
    api, _, _ = fake_server
    with Client(api.address, timeout=10) as client:
        model = client.status().model
    assert (model.vocab_size, model.max_context_tokens) == (VOCAB, MAX_CONTEXT)


def test_concurrent_streams_for_several_adapters(fake_server) -> None:
    api, fleet, _ = fake_server
    jobs = [([5, 6, 7], "alice", 5), ([9, 9], "bob", 3), ([1, 2, 3, 4], None, 6), ([8], "alice", 1)]
    with Client(api.address, timeout=10) as client:
        client.wait_ready(5)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(client.generate, p, adapter=a, sampling=SamplingParams(max_new_tokens=n))
                for p, a, n in jobs
            ]
            results = [f.result(10) for f in futures]
    for (prompt, adapter, n), result in zip(jobs, results):
        assert result.token_ids == fleet.expected_tokens(prompt, adapter, n)
        assert result.text == "".join(f"<{t}>" for t in result.token_ids)
        assert result.finish_reason is FinishReason.LENGTH
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.generated_tokens == n
        assert 0 < result.usage.time_to_first_token_s <= result.usage.total_time_s


def test_stream_yields_chunks_and_keeps_request_id(fake_server) -> None:
    api, _, _ = fake_server
    with Client(api.address, timeout=10) as client:
        chunks = list(client.stream("hey", adapter="bob", sampling={"max_new_tokens": 4}, request_id="my-id"))
    assert len(chunks) == 4
    assert all(c.request_id == "my-id" for c in chunks)
    assert [c.finish_reason for c in chunks] == [None, None, None, FinishReason.LENGTH]
    assert chunks[-1].usage is not None and chunks[0].usage is None


def test_async_client(fake_server) -> None:
    api, fleet, _ = fake_server

    async def main() -> list:
        async with AsyncClient(api.address, timeout=10) as client:
            await client.wait_ready(5)
            results = await asyncio.gather(
                *(client.generate([3, i], adapter="alice", sampling={"max_new_tokens": 3}) for i in range(4))
            )
            assert set(await client.list_adapters()) == {"alice", "bob"}
            status = await client.status()
            assert status.model.vocab_size == VOCAB
            return results

    results = asyncio.run(main())
    for i, result in enumerate(results):
        assert result.token_ids == fleet.expected_tokens([3, i], "alice", 3)


BAD_REQUESTS = [
    ({"prompt": [1, 2], "adapter": "carol"}, grpc.StatusCode.NOT_FOUND, "carol"),
    (
        {"prompt": [1, 2], "sampling": {"max_new_tokens": -3}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    (
        {"prompt": [1, 2], "sampling": {"max_new_tokens": 0}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens",
    ),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"prompt": []}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ({"prompt": [1] * MAX_CONTEXT}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ({"prompt": [1], "sampling": {"top_p": 0.0}}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"prompt": [1], "sampling": {"top_p": 1.5}}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"prompt": [1], "sampling": {"temperature": -1.0}}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"prompt": [1], "sampling": {"top_k": -1}}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ({"prompt": [VOCAB + 5]}, grpc.StatusCode.INVALID_ARGUMENT, str(VOCAB)),
    ({"prompt": [13, 1], "adapter": "bob"}, grpc.StatusCode.INTERNAL, "worker died twice"),
    (
        {"prompt": [66, 1], "adapter": "bob", "sampling": {"max_new_tokens": 8}},
        grpc.StatusCode.INTERNAL,
        "out of memory",
    ),
]


@pytest.mark.parametrize(("kwargs", "code", "needle"), BAD_REQUESTS)
def test_generate_errors_have_status_and_message(fake_server, kwargs, code, needle) -> None:
    api, _, _ = fake_server
    prompt = kwargs.pop("prompt")
    with Client(api.address, timeout=10) as client, pytest.raises(ApiError) as info:
        client.generate(prompt, **kwargs)
    assert info.value.code == code
    assert needle in info.value.details


def test_queue_full_is_resource_exhausted(fake_server) -> None:
    api, fleet, _ = fake_server
    with Client(api.address, timeout=10) as client:
        streams = [client.stream([i + 1], sampling={"max_new_tokens": 500}) for i in range(fleet.max_running)]
        for s in streams:
            next(s)  # each now holds a slot
        with pytest.raises(ApiError) as info:
            client.generate([1], sampling={"max_new_tokens": 1})
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in info.value.details
        for s in streams:
            s.close()
    assert _wait_until(lambda: not fleet.held)


def test_shutting_down_is_unavailable(fake_server) -> None:
    api, _, lt = fake_server
    lt.run(api.begin_shutdown())
    with Client(api.address, timeout=10) as client:
        with pytest.raises(ApiError) as info:
            client.generate([1, 2])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details
        with pytest.raises(ApiError) as info:
            client.list_adapters()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_fleet_shutting_down_is_unavailable(fake_server) -> None:
    api, fleet, _ = fake_server
    fleet.closing = True
    with Client(api.address, timeout=10) as client, pytest.raises(ApiError) as info:
        client.generate([1, 2])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_adapter_management_errors(fake_server) -> None:
    api, _, _ = fake_server
    with Client(api.address, timeout=10) as client:
        client.register_adapter("carol", "/adapters/carol")
        assert client.list_adapters()["carol"] == "/adapters/carol"
        client.unregister_adapter("carol")
        assert "carol" not in client.list_adapters()
        client.register_adapter("busy-1", "/adapters/v1")
        cases = [
            (
                lambda: client.register_adapter("dave", "/elsewhere"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "adapter_config",
            ),
            (lambda: client.register_adapter("", "/adapters/x"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
            (lambda: client.register_adapter("x", ""), grpc.StatusCode.INVALID_ARGUMENT, "path"),
            (lambda: client.unregister_adapter("nobody"), grpc.StatusCode.NOT_FOUND, "nobody"),
            (
                lambda: client.register_adapter("busy-1", "/adapters/v2"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "in use by 1 unfinished request",
            ),
        ]
        for call, code, needle in cases:
            with pytest.raises(ApiError) as info:
                call()
            assert info.value.code == code
            assert needle in info.value.details


def test_cancelled_stream_aborts_and_frees_blocks(fake_server) -> None:
    api, fleet, _ = fake_server
    with Client(api.address, timeout=10) as client:
        stream = client.stream(
            [1, 2, 3, 4, 5, 6, 7, 8], request_id="cancel-me", sampling={"max_new_tokens": 500}
        )
        next(stream)
        next(stream)
        assert client.status().free_kv_blocks < fleet.total_blocks
        stream.close()  # cancels the call
        assert _wait_until(lambda: "cancel-me" in fleet.abort_requested)
        assert _wait_until(lambda: client.status().free_kv_blocks == fleet.total_blocks)


def test_deadline_aborts_the_request(fake_server) -> None:
    api, fleet, _ = fake_server
    with Client(api.address) as client:
        with pytest.raises(ApiError) as info:
            client.generate([4, 4], request_id="too-slow", sampling={"max_new_tokens": 500}, timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_until(lambda: "too-slow" in fleet.abort_requested)
        assert _wait_until(lambda: client.status().free_kv_blocks == fleet.total_blocks)


def test_health_and_reflection(fake_server) -> None:
    api, _, _ = fake_server
    channel = grpc.insecure_channel(api.address)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="lorafleet.v1.LoraFleet"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"lorafleet.v1.LoraFleet", "grpc.health.v1.Health"} <= names
        answers = list(
            stub.ServerReflectionInfo(
                iter(
                    [reflection_pb2.ServerReflectionRequest(file_containing_symbol="lorafleet.v1.LoraFleet")]
                )
            )
        )
        assert answers[0].file_descriptor_response.file_descriptor_proto
    finally:
        channel.close()


def test_cli_generate_exits_non_zero_on_a_stream_the_server_aborted(fake_server, capsys) -> None:
    from lorafleet.cli import main

    api, _, _ = fake_server
    base = ["generate", "--server", api.address, "--adapter", "bob", "--max-new-tokens", "6"]
    assert main([*base, "--prompt-ids", "77,1,2"]) == 1
    err = capsys.readouterr().err
    assert "lorafleet: error:" in err and "aborted by the server after 2 tokens" in err
    assert main([*base, "--prompt-ids", "5,1,2", "--json"]) == 0  # a complete stream is still fine


def test_undecodable_requests_are_invalid_argument(fake_server) -> None:
    """Garbage bytes or invalid UTF-8 in a string field: INVALID_ARGUMENT, not grpc's UNKNOWN."""
    api, _, _ = fake_server
    garbage = b"\xff\xff\xff\xff\xff"  # not even a valid field tag
    cases = [
        ("Generate", garbage),
        ("Generate", b"\x1a\x02\xff\xfe"),  # field 3 (adapter, a string) holding invalid UTF-8
        ("ListAdapters", garbage),
        ("RegisterAdapter", b"\x0a\x02\xff\xfe"),  # field 1 (name) holding invalid UTF-8
    ]
    with grpc.insecure_channel(api.address) as channel:
        for method, payload in cases:
            kind = channel.unary_stream if method == "Generate" else channel.unary_unary
            call = kind(
                f"/lorafleet.v1.LoraFleet/{method}",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as info:
                result = call(payload, timeout=10)
                if method == "Generate":
                    list(result)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, payload)
            assert "not a valid protobuf message" in info.value.details()
    with Client(api.address, timeout=10) as client:  # and valid requests still work
        assert "alice" in client.list_adapters()
