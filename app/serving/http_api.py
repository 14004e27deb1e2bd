"""The OpenAI-compatible HTTP API (FastAPI) over the same `Fleet` the gRPC servicer uses.

Routes: /v1/completions, /v1/chat/completions (JSON or SSE), /v1/models, /v1/load_lora_adapter,
/v1/unload_lora_adapter (vLLM's shapes) and /health. Requests are parsed by openai_types.py and
validated by validation.py (the gRPC checks), become the same `Request`s, and fail with OpenAI's
error body: 400 names the field, 404 an unknown model, 429 a full queue, 503 while draining.

Each choice (prompt x n) is one fleet request; `ChoiceStreams` merges their deltas. A client that
disconnects aborts every choice at once, which frees their KV blocks, as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.types import Receive, Scope, Send

from lorafleet.serving import openai_types as oai
from lorafleet.serving.api_types import ModelView
from lorafleet.serving.auth import ApiKeys
from lorafleet.serving.auth_http import BearerAuthMiddleware
from lorafleet.serving.chat_template import ChatTemplate, TemplateError
from lorafleet.serving.http_logprobs import ChoiceLogprobs
from lorafleet.serving.http_streams import ChoiceStreams, ClientGone, HttpError, http_error
from lorafleet.serving.metrics import RequestTracker, ServerMetrics
from lorafleet.serving.sse_chunks import ChunkWriter
from lorafleet.serving.validation import FieldError, build_request, check_prompt_ids, check_stop_token_ids
from lorafleet.serving.validation import prompt_token_ids as validated_prompt
from lorafleet.worker.types import Request, TokenDelta

log = logging.getLogger(__name__)


class Codec(Protocol):
    """The model's tokenizer, as far as the HTTP API needs it (`lorafleet.worker.Tokenizer` fits)."""

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...
    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str: ...


class FleetLike(Protocol):
    def generate(self, request: Request) -> AsyncIterator[TokenDelta]: ...
    async def abort(self, request_id: str) -> None: ...
    def register_adapter(self, name: str, path: str) -> None: ...
    def unregister_adapter(self, name: str) -> None: ...
    def list_adapters(self) -> dict[str, str]: ...


@dataclasses.dataclass
class HttpState:
    fleet: FleetLike
    model: ModelView
    model_root: str
    codec: Codec | None
    chat_template: ChatTemplate | None
    metrics: ServerMetrics | None = None
    closing: bool = False  # draining: new calls get 503, running streams finish
    keys: ApiKeys | None = None  # bearer tokens every path needs (auth_http.py); None = open
    created: int = dataclasses.field(default_factory=oai.now_s)


class _SSEResponse(StreamingResponse):
    """A streaming response that always watches for the client leaving.

    Starlette only listens for http.disconnect under ASGI < 2.4 and otherwise waits for a send to
    fail, which never happens while a request waits in the fleet's queue; here a disconnect
    cancels the body iterator at once, and `streams.close()` then aborts the fleet requests (outside
    the cancelled scope, where anyio would cancel its awaits again).
    """

    def __init__(self, body: AsyncIterator[str], streams: ChoiceStreams) -> None:
        super().__init__(body, media_type="text/event-stream")
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def body() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(body)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.streams.close()


def make_app(state: HttpState) -> FastAPI:
    app = FastAPI(title="lorafleet", docs_url=None, redoc_url=None, openapi_url=None)
    api = _Api(state)

    @app.exception_handler(HTTPException)
    async def _http_exception(_request: HttpRequest, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(oai.error_body(str(exc.detail), kind, None, exc.status_code), exc.status_code)

    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/load_lora_adapter", api.load_adapter, methods=["POST"])
    app.add_api_route("/v1/unload_lora_adapter", api.unload_adapter, methods=["POST"])
    if state.keys is not None:
        # Outermost, so it runs before routing: unknown paths and bodies are not looked at unauthenticated.
        app.add_middleware(BearerAuthMiddleware, keys=state.keys)
    return app


async def _json_body(request: HttpRequest) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FieldError(None, f"the request body is not valid JSON ({exc})") from None


class _Api:
    def __init__(self, state: HttpState) -> None:
        self.s = state

    # ---------------------------------------------------------------- small routes

    async def health(self) -> Response:
        if self.s.closing:
            return http_error(HttpError(503, "the server is shutting down", "unavailable")).response()
        return Response(status_code=200)

    async def models(self) -> Response:
        s = self.s
        cards = [oai.model_card(s.model.name, s.model_root, None, s.created, s.model.max_context_tokens)]
        for name, path in sorted(s.fleet.list_adapters().items()):
            cards.append(oai.model_card(name, str(path), s.model.name, s.created, s.model.max_context_tokens))
        return JSONResponse({"object": "list", "data": cards})

    async def load_adapter(self, request: HttpRequest) -> Response:
        # vLLM's shape: {"lora_name": ..., "lora_path": ...}; the same fleet call as gRPC RegisterAdapter.
        try:
            self._refuse_if_closing()
            body = await _json_body(request)
            name, path = self._adapter_fields(body, {"lora_name", "lora_path", "load_inplace"}, "lora_path")
            if name == self.s.model.name:
                raise FieldError("lora_name", f"lora_name {name!r} is the base model's name")
            try:
                self.s.fleet.register_adapter(name, path)
            except (ValueError, KeyError) as exc:
                raise FieldError(
                    "lora_path", f"lora_path: adapter {name!r} ({path}): {_message(exc)}"
                ) from exc
        except Exception as exc:
            return http_error(exc).response()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: HttpRequest) -> Response:
        try:
            self._refuse_if_closing()
            body = await _json_body(request)
            name, _ = self._adapter_fields(body, {"lora_name", "lora_int_id"}, None)
            try:
                self.s.fleet.unregister_adapter(name)
            except KeyError as exc:
                message = f"lora_name: {_message(exc)}"
                raise HttpError(404, message, "not_found", "lora_name", "adapter_not_found") from exc
        except Exception as exc:
            return http_error(exc).response()
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @staticmethod
    def _adapter_fields(body: Any, allowed: set[str], path_key: str | None) -> tuple[str, str]:
        if not isinstance(body, dict):
            raise FieldError(None, "the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise FieldError(unknown[0], f"unknown field {unknown[0]!r}")
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise FieldError("lora_name", "lora_name must be a non-empty string")
        path = body.get(path_key) if path_key else ""
        if path_key and (not isinstance(path, str) or not path):
            raise FieldError(path_key, f"{path_key} must be a non-empty string (the adapter's folder)")
        return name, path or ""

    def _refuse_if_closing(self) -> None:
        if self.s.closing:
            raise HttpError(503, "the server is shutting down", "unavailable")

    # ---------------------------------------------------------------- generation

    async def completions(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat(self, request: HttpRequest) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, http: HttpRequest, *, chat: bool) -> Response:
        arrival = time.monotonic()
        try:
            self._refuse_if_closing()
            body = await _json_body(http)
            spec = oai.parse_chat(body) if chat else oai.parse_completion(body)
            adapter = self._adapter_for(spec.model)
            prompts = self._prompt_ids(spec, chat)
            requests = self._requests(spec, prompts, adapter)
        except Exception as exc:
            error = http_error(exc)
            if self.s.metrics is not None:
                RequestTracker(self.s.metrics, "http", None, arrival).finish(error.status, time.monotonic())
            return error.response()
        trackers = [RequestTracker(self.s.metrics, "http", adapter, arrival) for _ in requests]
        streams = ChoiceStreams(self.s.fleet, requests, trackers, self.s.metrics)
        shape = _Shape(spec, chat, self.s.codec, prompts, len(requests))
        # A client that leaves while its request waits in the queue is noticed now, not at its first token.
        watcher = asyncio.create_task(_watch_disconnect(http, streams))
        try:
            await streams.start()  # admission errors (404, 429, 503, 400) before any byte is sent
        except Exception as exc:
            await _stop(watcher)
            await streams.close()
            return Response(status_code=499) if isinstance(exc, ClientGone) else http_error(exc).response()
        if spec.stream:
            await _stop(watcher)  # the SSE response listens for the disconnect from here on
            return _SSEResponse(_sse(streams, shape), streams)
        return await _collect(streams, shape, watcher)

    def _adapter_for(self, model: str) -> str | None:
        if model == self.s.model.name:
            return None
        if model in self.s.fleet.list_adapters():
            return model
        raise HttpError(404, f"The model `{model}` does not exist.", "not_found", "model", "model_not_found")

    def _prompt_ids(self, spec: oai.GenerationSpec, chat: bool) -> list[tuple[int, ...]]:
        s = self.s
        vocab, context = s.model.vocab_size or None, s.model.max_context_tokens or None
        if chat:
            if s.chat_template is None or s.codec is None:
                raise FieldError(
                    "messages", "messages: this model has no chat template in tokenizer_config.json"
                )
            try:
                text = s.chat_template.render(spec.messages)
            except TemplateError as exc:
                raise FieldError("messages", f"messages: {exc}") from exc
            ids = tuple(s.codec.encode(text, add_special_tokens=False))  # the template placed them
            if not ids:
                raise FieldError("messages", "messages: the rendered conversation is empty")
            return [check_prompt_ids(ids, vocab_size=vocab, max_context_tokens=context, field="messages")]

        def encode(text: str) -> list[int]:
            if s.codec is None:
                raise FieldError("prompt", "prompt: this model has no tokenizer.json; send token ids")
            return s.codec.encode(text, add_special_tokens=True)  # as gRPC and Engine.generate do

        return [
            validated_prompt(p, encode=encode, vocab_size=vocab, max_context_tokens=context)
            for p in spec.prompts
        ]

    def _requests(
        self, spec: oai.GenerationSpec, prompts: list[tuple[int, ...]], adapter: str | None
    ) -> list[Request]:
        sampling = dataclasses.replace(spec.sampling, logprobs=spec.logprobs)
        check_stop_token_ids(sampling, self.s.model.vocab_size or None)
        if not spec.max_tokens_set:  # chat's default: whatever the context leaves
            room = self.s.model.max_context_tokens - len(prompts[0])
            sampling = dataclasses.replace(sampling, max_new_tokens=max(room, 1))
        base = oai.new_id("cmpl")
        out = []
        for p, ids in enumerate(prompts):
            for i in range(spec.n):
                choice = sampling
                if spec.n > 1 and sampling.seed is not None:
                    # Same seed for every choice would give n copies; choice i draws from seed + i.
                    choice = dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**63)
                out.append(
                    build_request(
                        request_id=f"{base}-{p * spec.n + i}",
                        token_ids=ids,
                        adapter=adapter,
                        sampling=choice,
                        arrival_time=time.time(),
                    )
                )
        return out


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


# -------------------------------------------------------------------- response shapes


class _Shape:
    """Turns the fleet's deltas into OpenAI completion or chat objects for one HTTP request."""

    def __init__(
        self,
        spec: oai.GenerationSpec,
        chat: bool,
        codec: Codec | None,
        prompts: list[tuple[int, ...]],
        n: int,
    ) -> None:
        self.spec, self.chat, self.codec = spec, chat, codec
        self.id = oai.new_id("chatcmpl" if chat else "cmpl")
        self.created = oai.now_s()
        self.object = "chat.completion" if chat else "text_completion"
        self.writer = ChunkWriter(
            id=self.id,
            object="chat.completion.chunk" if chat else "text_completion",
            created=self.created,
            model=spec.model,
            include_usage=spec.include_usage,
        )
        self.prompts = prompts
        self.texts = [""] * n
        self.offsets = [0] * n  # completions logprobs: text_offset of the next token
        self.tokens = [0] * n
        self.logprobs = [ChoiceLogprobs(spec.sampling.top_logprobs > 0) for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        if spec.echo:
            for i in range(n):
                self.texts[i] = self.prompt_text(i)
                self.offsets[i] = len(self.texts[i])

    def prompt_text(self, choice: int) -> str:
        spec = self.spec
        prompt = spec.prompts[choice // spec.n]
        if isinstance(prompt, str):
            return prompt
        return self.codec.decode(list(prompt)) if self.codec is not None else ""

    def token_strings(self, ids: tuple[int, ...]) -> list[str]:
        if self.spec.tokens_as_ids or self.codec is None:
            return [f"token_id:{t}" for t in ids]
        return [self.codec.decode([t], skip_special_tokens=False) for t in ids]

    def usage(self) -> dict[str, int]:
        return oai.usage(sum(len(p) for p in self.prompts), sum(self.tokens))

    def add(self, choice: int, delta: TokenDelta) -> dict[str, Any] | None:
        """Record a delta; returns the chunk's choice object (None: nothing to send)."""
        self.tokens[choice] += len(delta.new_token_ids)
        self.texts[choice] += delta.new_text
        logprobs = None
        if self.spec.logprobs and delta.new_logprobs is not None:
            step = ChoiceLogprobs(self.spec.sampling.top_logprobs > 0)
            step.add(self.token_strings, delta)
            self.logprobs[choice].extend(step)
            logprobs = step.shape(self.chat, self.offsets[choice])
            if not self.chat:
                self.offsets[choice] += sum(len(t) for t in step.tokens)
        self.finish[choice] = oai.finish_reason(delta.finish_reason)
        if not delta.new_token_ids and not delta.new_text and delta.finish_reason is None:
            return None
        if self.chat:
            return {
                "index": choice,
                "delta": {"content": delta.new_text} if delta.new_text or delta.new_token_ids else {},
                "logprobs": logprobs,
                "finish_reason": self.finish[choice],
            }
        return {
            "index": choice,
            "text": delta.new_text,
            "logprobs": logprobs,
            "finish_reason": self.finish[choice],
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        return self.writer.chunk(choices, usage)

    def opening(self, choice: int) -> dict[str, Any] | None:
        """The first chunk of a choice: the assistant role (chat) or the echoed prompt."""
        if self.chat:
            return {
                "index": choice,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        if self.spec.echo:
            return {"index": choice, "text": self.texts[choice], "logprobs": None, "finish_reason": None}
        return None

    def final(self) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            if self.chat:
                logprobs = self.logprobs[i].shape(True, 0) if self.spec.logprobs else None
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": self.finish[i],
                    }
                )
            else:
                start = len(self.prompt_text(i)) if self.spec.echo else 0
                logprobs = self.logprobs[i].shape(False, start) if self.spec.logprobs else None
                choices.append(
                    {"index": i, "text": text, "logprobs": logprobs, "finish_reason": self.finish[i]}
                )
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.spec.model,
            "choices": choices,
            "usage": self.usage(),
        }


async def _sse(streams: ChoiceStreams, shape: _Shape) -> AsyncIterator[str]:
    try:
        for i in range(streams.count):
            opening = shape.opening(i)
            if opening is not None:
                yield shape.chunk([opening])
        async for choice, delta in streams:
            out = shape.add(choice, delta)
            if out is not None:
                yield shape.chunk([out])
        if shape.spec.include_usage:
            yield shape.chunk([], shape.usage())
    except ClientGone:
        return
    except Exception as exc:  # headers are sent: the error travels as an SSE event, as vLLM does
        yield f"data: {json.dumps(http_error(exc).body())}\n\n"
    await streams.close()
    yield "data: [DONE]\n\n"


async def _watch_disconnect(http: HttpRequest, streams: ChoiceStreams) -> None:
    # The body is read, so the next message is http.disconnect: the client left early.
    while (await http.receive())["type"] != "http.disconnect":
        pass
    streams.client_gone()


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _collect(streams: ChoiceStreams, shape: _Shape, watcher: asyncio.Task[None]) -> Response:
    try:
        async for choice, delta in streams:
            shape.add(choice, delta)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the fleet requests are aborted
    except Exception as exc:
        return http_error(exc).response()
    finally:
        await _stop(watcher)
        await streams.close()
    return JSONResponse(shape.final())
