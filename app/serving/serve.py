"""Wiring of `lorafleet serve`: the Fleet, the gRPC server (+ health, reflection), the OpenAI-compatible
HTTP API, metrics, shutdown.

`start_api` puts the gRPC, HTTP and metrics endpoints in front of any fleet (tests use a fake one).
The HTTP API is a uvicorn server running as a task on the same asyncio loop as grpc.aio and the
fleet, so both APIs reach the fleet without a thread or process hop;
`start_serving` also starts the real Fleet and registers the configured adapters; `serve` runs
until SIGINT/SIGTERM, then drains: new calls get UNAVAILABLE, admitted requests finish (up to
`drain_timeout_s`), the workers stop, and the process exits 0. Both APIs drain together. When the
fleet loses its Ray cluster (its GCS silent for `ray_lost_timeout_s`), every request fails with
UNAVAILABLE, the API closes and `serve` raises `ClusterLostError` (the CLI exits 1 with its message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lorafleet.config import ServeConfig
from lorafleet.proto.lorafleet.v1 import serving_pb2, serving_pb2_grpc
from lorafleet.scheduler.errors import ClusterLostError
from lorafleet.serving.api_types import ModelView
from lorafleet.serving.auth import ApiKeys, load_keys
from lorafleet.serving.auth_grpc import BearerAuthInterceptor
from lorafleet.serving.chat_template import ChatTemplate
from lorafleet.serving.grpc_decode import DecodeErrorInterceptor
from lorafleet.serving.http_api import HttpState, make_app
from lorafleet.serving.metrics import ServerMetrics
from lorafleet.serving.security_warnings import security_warnings
from lorafleet.serving.server import FleetLike, LoraFleetServicer
from lorafleet.serving.tls import server_credentials
from lorafleet.worker import memory_probe

log = logging.getLogger(__name__)
SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["LoraFleet"].full_name
METRICS_POLL_S = 1.0


@dataclass
class ApiServer:
    """A running gRPC (+ metrics) front end; `stop` closes it but leaves the fleet to its owner."""

    grpc_server: grpc.aio.Server
    servicer: LoraFleetServicer
    health: health.aio.HealthServicer
    host: str
    port: int
    metrics: ServerMetrics | None = None
    metrics_port: int | None = None
    metrics_host: str | None = None
    _metrics_http: Any = None
    _poller: asyncio.Task[None] | None = None
    fleet: Any = field(default=None, repr=False)
    http: HttpServer | None = None

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def begin_shutdown(self) -> None:
        """New calls get UNAVAILABLE and health says NOT_SERVING; running streams go on."""
        self.servicer.closing = True
        if self.http is not None:
            self.http.state.closing = True
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.begin_shutdown()
        if self.http is not None:
            await self.http.stop(grace_s)
        await self.grpc_server.stop(grace_s)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._metrics_http is not None:
            # shutdown() waits for the serving thread's 0.5 s poll; keep the event loop free meanwhile.
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # serve() owns SIGINT/SIGTERM and drains both APIs; uvicorn's own handlers would stop the
        # HTTP side alone at the first signal.
        yield


@dataclass
class HttpServer:
    """The OpenAI-compatible API: a uvicorn server task on the running loop."""

    state: HttpState
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @classmethod
    async def start(cls, state: HttpState, host: str, port: int) -> HttpServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))  # bound here so port 0 resolves and a taken port fails now
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror}") from None
        config = uvicorn.Config(
            make_app(state), lifespan="off", http="h11", log_level="warning", access_log=False
        )
        server = _EmbeddedUvicorn(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                task.result()
                raise OSError(f"the HTTP server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.01)
        return cls(state, server, task, sock.getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; open streams get grace_s to end, then they are cancelled (and aborted)."""
        self.server.config.timeout_graceful_shutdown = max(grace_s, 0.1)
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def http_state(fleet: Any, model: ModelView, model_dir: str | Path | None) -> HttpState:
    """What the HTTP API needs of the model: its tokenizer (if any) and chat template (if any)."""
    codec = chat = None
    if model_dir is not None:
        from lorafleet.worker.tokenizer import Tokenizer

        with contextlib.suppress(FileNotFoundError):
            codec = Tokenizer.from_dir(model_dir)
        chat = ChatTemplate.from_dir(model_dir)
    root = str(Path(model_dir).resolve()) if model_dir is not None else model.name
    return HttpState(fleet=fleet, model=model, model_root=root, codec=codec, chat_template=chat)


def model_view(model_dir: str | Path, engine_options: dict[str, Any]) -> ModelView:
    """Name, vocabulary and context limit of the served model (config.json only, no weights)."""
    from lorafleet.worker.model_config import ModelConfig

    config = ModelConfig.from_dir(model_dir)
    max_len = engine_options.get("max_model_len") or config.max_position_embeddings
    return ModelView(
        name=Path(model_dir).resolve().name, vocab_size=config.vocab_size, max_context_tokens=int(max_len)
    )


def text_encoder(model_dir: str | Path) -> Callable[[str], Sequence[int]]:
    """Encode prompts exactly as the engine's offline `generate` does (with special tokens)."""
    from lorafleet.worker.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(model_dir)
    except FileNotFoundError:

        def no_tokenizer(text: str) -> Sequence[int]:
            raise ValueError("this model has no tokenizer.json: send token_ids instead of text")

        return no_tokenizer
    return lambda text: tokenizer.encode(text, add_special_tokens=True)


async def _poll_metrics(fleet: FleetLike, metrics: ServerMetrics) -> None:
    while True:
        try:
            metrics.observe_cluster(fleet.status())
        except Exception:  # a failing status read must not kill the poller
            log.warning("reading the fleet status for metrics failed", exc_info=True)
        await asyncio.sleep(METRICS_POLL_S)


async def start_api(
    fleet: FleetLike,
    *,
    model: ModelView,
    encode: Callable[[str], Sequence[int]],
    host: str = "127.0.0.1",
    port: int = 0,
    metrics_port: int | None = None,
    top_adapters: int = 20,
    http_port: int | None = None,
    http: HttpState | None = None,
    keys: ApiKeys | None = None,
    tls: grpc.ServerCredentials | None = None,
    metrics_host: str = "127.0.0.1",
) -> ApiServer:
    """Serve `fleet` over gRPC on host:port (0 = any free port), the OpenAI-compatible HTTP API on
    http_port (None = off; `http` carries its tokenizer and chat template) and /metrics on
    metrics_host:metrics_port.

    With `keys`, every gRPC method, HTTP path and /metrics needs a bearer token (auth_grpc.py,
    auth_http.py); with `tls`, gRPC is served over TLS only.
    """
    metrics = ServerMetrics(top_adapters=top_adapters)
    metrics.is_registered = lambda name: name in fleet.list_adapters()
    servicer = LoraFleetServicer(fleet, model=model, encode=encode, metrics=metrics)
    # Auth first: an unauthenticated caller's bytes are refused before anything decodes them.
    interceptors: list[grpc.aio.ServerInterceptor] = [BearerAuthInterceptor(keys)] if keys is not None else []
    interceptors.append(DecodeErrorInterceptor())
    server = grpc.aio.server(interceptors=interceptors)
    serving_pb2_grpc.add_LoraFleetServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a failed bind this way
        raise OSError(f"cannot listen on {host}:{port}: address in use or not on this machine") from exc
    await server.start()
    api = ApiServer(server, servicer, health_servicer, host, bound, metrics=metrics, fleet=fleet)
    if metrics_port is not None:
        try:
            api._metrics_http, api.metrics_port = metrics.serve(metrics_host, metrics_port, keys)
        except OSError as exc:
            await server.stop(0)
            raise OSError(f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc}") from exc
        api.metrics_host = metrics_host
    if http_port is not None:
        state = http if http is not None else http_state(fleet, model, None)
        state.metrics = metrics
        state.keys = keys
        try:
            api.http = await HttpServer.start(state, host, http_port)
        except BaseException:
            await api.stop(0)
            raise
    api._poller = asyncio.create_task(_poll_metrics(fleet, metrics))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return api


def fleet_config(config: ServeConfig) -> Any:
    from lorafleet.scheduler.fleet_config import FleetConfig

    return FleetConfig(
        model_dir=config.model,
        device=config.device,
        dtype=config.dtype,
        min_workers=config.workers,
        max_workers=config.max_workers or config.workers,
        policy=config.policy,
        pack_batch_target=config.pack_batch_target,
        max_queue=config.max_queue,
        consolidation_interval_s=config.consolidation_interval_s,
        idle_release_s=config.idle_release_s,
        engine=dict(config.engine),
        ray_address=config.ray_address,
        adapter_roots=config.effective_adapter_roots(),
        ray_connect_timeout_s=config.ray_connect_timeout_s,
        ray_lost_timeout_s=config.ray_lost_timeout_s,
    )


def check_port_free(host: str, port: int | None, what: str) -> None:
    """Fail fast, before Ray and the workers start, when a fixed port is taken."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None


def check_model_dir(model: str) -> None:
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model folder {model!r} does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {model!r} has no config.json (not a Hugging Face model folder)")


async def start_serving(config: ServeConfig) -> ApiServer:
    """Start the Fleet, register the configured adapters, and open the API. Errors name the culprit."""
    from lorafleet.scheduler.fleet import Fleet
    from lorafleet.worker.engine_config import EngineConfig

    check_model_dir(config.model)
    # Keys and certificates fail before Ray starts, each naming its file (never a token).
    keys = load_keys(config.api_keys_file) if config.api_keys_file is not None else None
    tls = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    for warning in security_warnings(config):
        print(warning, file=sys.stderr, flush=True)
    check_port_free(config.host, config.port, "gRPC")
    check_port_free(config.metrics_host, config.metrics_port, "metrics")
    check_port_free(config.host, config.http_port, "HTTP")
    EngineConfig.from_dict(dict(config.engine))  # a typo in an engine option fails before Ray starts
    adapters = config.adapter_sources()
    model = model_view(config.model, dict(config.engine))
    encode = text_encoder(config.model)
    http = http_state(None, model, config.model) if config.http_port is not None else None
    fleet = await Fleet.start(fleet_config(config))
    if http is not None:
        http.fleet = fleet
    try:
        for name, path in adapters:
            try:
                fleet.register_adapter(name, path, confined=False)  # the operator's own
            except (ValueError, KeyError) as exc:
                raise ValueError(f"adapter {name!r} ({path}): {exc}") from exc
        api = await start_api(
            fleet,
            model=model,
            encode=encode,
            host=config.host,
            port=config.port,
            metrics_port=config.metrics_port,
            top_adapters=config.metrics_top_adapters,
            http_port=config.http_port,
            http=http,
            keys=keys,
            tls=tls,
            metrics_host=config.metrics_host,
        )
    except BaseException:
        await fleet.shutdown(drain=False)
        raise
    return api


async def shutdown_serving(
    api: ApiServer, drain_timeout_s: float, abort_now: asyncio.Event | None = None
) -> None:
    """Drain: refuse new calls, let admitted requests finish, stop the workers, close the API.

    Running requests are aborted (their streams end with ABORT) when `drain_timeout_s` passes or
    `abort_now` is set, whichever comes first.
    """
    await api.begin_shutdown()
    fleet = api.fleet
    drain = asyncio.create_task(fleet.shutdown(drain=True))
    waiters: set[asyncio.Task[Any]] = {drain}
    if abort_now is not None:
        waiters.add(asyncio.create_task(abort_now.wait()))
    done, _ = await asyncio.wait(waiters, timeout=drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    for task in waiters - {drain}:
        task.cancel()
    if drain in done:
        drain.result()
    else:
        log.warning("aborting the requests still running")
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await fleet.shutdown(drain=False)
    await api.stop(grace_s=2.0)


def bookkeeping_sizes(api: ApiServer) -> dict[str, int]:
    """The fleet's and the metrics' per-request and per-name structures, by size (memory probe)."""
    sizes = dict(api.fleet.bookkeeping_sizes())
    if api.metrics is not None:
        sizes.update(api.metrics.bookkeeping_sizes())
    return sizes


async def close_after_loss(api: ApiServer) -> None:
    """The fleet lost its Ray cluster and has failed its requests: close the API (their streams end
    with UNAVAILABLE first) and release the fleet."""
    await api.begin_shutdown()
    await api.stop(grace_s=2.0)
    await api.fleet.shutdown(drain=False)


async def serve(config: ServeConfig, *, on_ready: Callable[[ApiServer], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly (a second signal skips the drain)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    probe_settings = memory_probe.settings_from_env()  # a bad variable fails before Ray starts
    api = await start_serving(config)
    # ray.init replaces the SIGTERM handler with its own `sys.exit(15)`, which would end the process
    # mid-stream (how systemd and Kubernetes stop a service): take it back so SIGTERM drains too.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    probe = memory_probe.start(probe_settings, lambda: bookkeeping_sizes(api)) if probe_settings else None
    if on_ready is not None:
        on_ready(api)
    stopped = asyncio.ensure_future(stop.wait())
    lost = asyncio.ensure_future(api.fleet.wait_lost())
    await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
    if probe is not None:
        probe.cancel()
    if lost.done():
        stopped.cancel()
        await close_after_loss(api)
        raise ClusterLostError(
            f"{lost.result()}; exiting (start lorafleet serve again once the Ray cluster is back)"
        )
    lost.cancel()
    stop.clear()
    print(
        f"lorafleet: shutting down; running requests get {config.drain_timeout_s:.0f} s "
        "(Ctrl-C again to abort them)",
        file=sys.stderr,
        flush=True,
    )
    await shutdown_serving(api, config.drain_timeout_s, abort_now=stop)
