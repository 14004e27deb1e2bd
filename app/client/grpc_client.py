"""Python clients of a lorafleet server: `Client` (blocking) and `AsyncClient` (asyncio).

Both return plain dataclasses (lorafleet.serving.api_types) and raise `ApiError` carrying the gRPC
status code and the server's message. Leaving a `stream()` early cancels the call, which aborts the
sequence on its worker.

    with Client("127.0.0.1:50051") as client:
        result = client.generate("Hello", adapter="alice", sampling=SamplingParams(temperature=0))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.proto.lorafleet.v1 import serving_pb2 as pb
from lorafleet.proto.lorafleet.v1 import serving_pb2_grpc
from lorafleet.serving import convert
from lorafleet.serving.api_types import ClusterView, GenerateChunk, GenerateResult
from lorafleet.worker.types import SamplingParams

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LoraFleet"].full_name  # what health checks name
Sampling = SamplingParams | Mapping[str, Any] | None


class ApiError(Exception):
    """A call failed; `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ApiError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The bearer token as call metadata (sent with every call, health checks included)."""
    if token is None:
        return None
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token must be one word without spaces")
    return (("authorization", f"Bearer {token}"),)


def _tls(ca: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """TLS when any TLS file is given (plain gRPC otherwise)."""
    if ca is None and cert is None and key is None:
        return None
    from lorafleet.serving.tls import channel_credentials

    return channel_credentials(ca, cert, key)


def _check_target(target: str) -> str:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"server address {target!r} must look like HOST:PORT")
    return target


class _ClientBase:
    """The set-up both clients share: the checked address, the default deadline, the auth metadata,
    the channel (plain or TLS) and the stubs. `_channels` is the module whose `insecure_channel` /
    `secure_channel` open it: `grpc` for the blocking client, `grpc.aio` for the asyncio one."""

    _channels: ClassVar[ModuleType] = grpc

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
    ) -> None:
        self.target = _check_target(target)
        self.timeout = timeout
        self._metadata = _auth_metadata(token)
        credentials = _tls(tls_ca, tls_client_cert, tls_client_key)
        self._channel = (
            self._channels.insecure_channel(target)
            if credentials is None
            else self._channels.secure_channel(target, credentials)
        )
        self._stub = serving_pb2_grpc.LoraFleetStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_ClientBase):
    """Blocking client; `timeout` (seconds) is the default deadline of every call (None = none)."""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server reports SERVING; TimeoutError (naming the address) otherwise."""
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0, metadata=self._metadata
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.1)
        raise TimeoutError(f"server {self.target} not ready after {timeout:.0f} s ({last})")

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        adapter: str | None = None,
        sampling: Sampling = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[GenerateChunk]:
        msg = convert.generate_request_to_proto(
            prompt, adapter=adapter, sampling=sampling, request_id=request_id
        )
        call = self._stub.Generate(msg, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            for response in call:
                yield convert.chunk_from_proto(response)
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once the stream has ended; aborts the sequence if we left early

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        return GenerateResult.from_chunks(list(self.stream(prompt, **kwargs)))

    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None

    def register_adapter(self, name: str, path: str, *, timeout: float | None = None) -> None:
        self._unary(self._stub.RegisterAdapter, pb.RegisterAdapterRequest(name=name, path=path), timeout)

    def unregister_adapter(self, name: str, *, timeout: float | None = None) -> None:
        self._unary(self._stub.UnregisterAdapter, pb.UnregisterAdapterRequest(name=name), timeout)

    def list_adapters(self, *, timeout: float | None = None) -> dict[str, str]:
        return convert.adapters_from_proto(
            self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        )

    def status(self, *, timeout: float | None = None) -> ClusterView:
        return convert.cluster_from_proto(
            self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        )


class AsyncClient(_ClientBase):
    """asyncio client; create and use it inside one running event loop."""

    _channels = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0, metadata=self._metadata
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.1)
        raise TimeoutError(f"server {self.target} not ready after {timeout:.0f} s ({last})")

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        adapter: str | None = None,
        sampling: Sampling = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        msg = convert.generate_request_to_proto(
            prompt, adapter=adapter, sampling=sampling, request_id=request_id
        )
        call = self._stub.Generate(msg, timeout=self._deadline(timeout), metadata=self._metadata)
        try:
            async for response in call:
                yield convert.chunk_from_proto(response)
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> GenerateResult:
        return GenerateResult.from_chunks([chunk async for chunk in self.stream(prompt, **kwargs)])

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ApiError.from_rpc_error(exc) from None

    async def register_adapter(self, name: str, path: str, *, timeout: float | None = None) -> None:
        await self._unary(
            self._stub.RegisterAdapter, pb.RegisterAdapterRequest(name=name, path=path), timeout
        )

    async def unregister_adapter(self, name: str, *, timeout: float | None = None) -> None:
        await self._unary(self._stub.UnregisterAdapter, pb.UnregisterAdapterRequest(name=name), timeout)

    async def list_adapters(self, *, timeout: float | None = None) -> dict[str, str]:
        reply = await self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return convert.adapters_from_proto(reply)

    async def status(self, *, timeout: float | None = None) -> ClusterView:
        reply = await self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        return convert.cluster_from_proto(reply)
