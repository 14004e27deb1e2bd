"""Auth on the gRPC API: every method the server offers, found by reflection, refuses a call
without a valid token, and the admin methods refuse a client token. A new RPC is covered by the
walk without being named here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorafleet.client.grpc_client import ApiError, Client
from lorafleet.serving.auth import ADMIN_GRPC_METHODS

DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# Written out here, not taken from lorafleet.serving.auth, so that dropping one from the code fails a test.
ADMIN_ONLY = {"/lorafleet.v1.LoraFleet/RegisterAdapter", "/lorafleet.v1.LoraFleet/UnregisterAdapter"}


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _reflect(channel: grpc.Channel, token: str) -> list[reflection_pb2.ServerReflectionResponse]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
    replies = list(stub.ServerReflectionInfo(iter(requests), metadata=_bearer(token), timeout=10))
    services = [s.name for s in replies[0].list_services_response.service]
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=name) for name in services]
    return replies + list(stub.ServerReflectionInfo(iter(requests), metadata=_bearer(token), timeout=10))


def all_methods(channel: grpc.Channel, token: str) -> dict[str, tuple[bool, bool]]:
    """'/package.Service/Method' -> (client streaming, server streaming), for every service listed."""
    replies = _reflect(channel, token)
    services = {s.name for s in replies[0].list_services_response.service}
    methods: dict[str, tuple[bool, bool]] = {}
    for reply in replies[1:]:
        for blob in reply.file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(blob)
            for service in file.service:
                full = f"{file.package}.{service.name}" if file.package else service.name
                if full not in services:
                    continue
                for m in service.method:
                    methods[f"/{full}/{m.name}"] = (m.client_streaming, m.server_streaming)
    return methods


def call_raw(
    channel: grpc.Channel, method: str, kind: tuple[bool, bool], token: str | None
) -> grpc.StatusCode:
    """Call `method` with an empty message (raw bytes); the final status code."""
    metadata = _bearer(token) if token is not None else None
    client_streaming, server_streaming = kind
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[kind]
    stub = factory(method)  # no serializers: the request and replies stay bytes
    request: Any = iter([b""]) if client_streaming else b""
    try:
        reply = stub(request, metadata=metadata, timeout=2)
        if server_streaming:
            for _ in reply:
                pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def channel(auth_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth_server["api"].address) as ch:
        yield ch


@pytest.fixture(scope="module")
def methods(channel, auth_server) -> dict[str, tuple[bool, bool]]:
    return all_methods(channel, auth_server["client"])


def test_reflection_finds_every_service(methods) -> None:
    services = {m.split("/")[1] for m in methods}
    assert {"lorafleet.v1.LoraFleet", "grpc.health.v1.Health"} <= services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert set(methods) >= ADMIN_ONLY  # a renamed admin RPC would otherwise be left open
    assert ADMIN_GRPC_METHODS == ADMIN_ONLY
    assert any(kind == (False, True) for kind in methods.values())  # streaming kinds are walked too


def test_every_method_refuses_a_call_without_a_token(channel, methods) -> None:
    for method, kind in methods.items():
        assert call_raw(channel, method, kind, None) == grpc.StatusCode.UNAUTHENTICATED, method


def test_every_method_refuses_a_wrong_token(channel, methods) -> None:
    for method, kind in methods.items():
        assert (
            call_raw(channel, method, kind, "not-a-valid-token-at-all") == grpc.StatusCode.UNAUTHENTICATED
        ), method


def test_admin_methods_refuse_a_client_token_and_the_rest_accept_it(channel, methods, auth_server) -> None:
    for method, kind in methods.items():
        code = call_raw(channel, method, kind, auth_server["client"])
        if method in ADMIN_ONLY:
            assert code == grpc.StatusCode.PERMISSION_DENIED, method
        else:
            assert code not in DENIED, (method, code)
    for method in ADMIN_ONLY:
        code = call_raw(channel, method, methods[method], auth_server["admin"])
        assert code not in DENIED, (method, code)


def test_clients_generate_and_list_admins_register(auth_server) -> None:
    address = auth_server["api"].address
    with Client(address, timeout=10, token=auth_server["client"]) as client:
        client.wait_ready(5)
        assert client.generate([5, 6], sampling={"max_new_tokens": 3}).usage.generated_tokens == 3
        assert "alice" in client.list_adapters()
        with pytest.raises(ApiError) as refused:
            client.unregister_adapter("alice")
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert auth_server["client"] not in refused.value.details
    with Client(address, timeout=10, token=auth_server["admin"]) as admin:
        admin.register_adapter("carol", "/adapters/carol")
        admin.unregister_adapter("carol")
    with Client(address, timeout=10) as anonymous, pytest.raises(ApiError) as refused:
        anonymous.status()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "alice" in auth_server["fleet"].adapters


def test_client_refuses_a_token_with_spaces() -> None:
    with pytest.raises(ValueError, match="one word"):
        Client("127.0.0.1:1", token="two words")
