"""The OpenAI-compatible HTTP API over the fake fleet: errors, streaming shape, disconnects, admin.

One server (gRPC + HTTP on the same loop) per module; each test restores what it changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lorafleet.client.grpc_client import ApiError, Client

# The fake server's model (tests/api/conftest.py, fake_http_server).
VOCAB = 384
MAX_CONTEXT = 64


@pytest.fixture(scope="module")
def server(fake_http_server) -> Iterator[dict[str, Any]]:
    with httpx.Client(base_url=fake_http_server["base"], timeout=20) as http:
        yield {**fake_http_server, "http": http}


def fake_encode(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


def expected_tokens(prompt: list[int], adapter: str | None, n: int) -> tuple[int, ...]:
    salt = sum(map(ord, adapter or ""))
    return tuple((sum(prompt) + 7 * i + salt) % VOCAB for i in range(n))


def _wait_until(check, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.02)
    return check()


C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "hi"}]
# (path, body, status, field named in error.param and in the message; None: check `needle` only)
BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    (C, b"{not json", 400, None),
    (C, [1, 2], 400, None),
    (C, {"prompt": [1]}, 400, "model"),
    (C, {"model": "nobody", "prompt": [1]}, 404, "model"),
    (C, {"model": "fake"}, 400, "prompt"),
    (C, {"model": "fake", "prompt": ""}, 400, "prompt"),
    (C, {"model": "fake", "prompt": []}, 400, "prompt"),
    (C, {"model": "fake", "prompt": [1, "a"]}, 400, "prompt"),
    (C, {"model": "fake", "prompt": [VOCAB + 3]}, 400, "prompt"),
    (C, {"model": "fake", "prompt": [1] * MAX_CONTEXT}, 400, "prompt"),
    (C, {"model": "fake", "prompt": [1], "max_tokens": 0}, 400, "max_tokens"),
    (C, {"model": "fake", "prompt": [1], "max_tokens": "5"}, 400, "max_tokens"),
    (C, {"model": "fake", "prompt": [1], "temperature": -1}, 400, "temperature"),
    (C, {"model": "fake", "prompt": [1], "temperature": True}, 400, "temperature"),
    (C, {"model": "fake", "prompt": [1], "top_p": 0}, 400, "top_p"),
    (C, {"model": "fake", "prompt": [1], "top_p": 1.5}, 400, "top_p"),
    (C, {"model": "fake", "prompt": [1], "top_k": -1}, 400, "top_k"),
    (C, {"model": "fake", "prompt": [1], "top_k": 2.5}, 400, "top_k"),
    (C, {"model": "fake", "prompt": [1], "seed": -1}, 400, "seed"),
    (C, {"model": "fake", "prompt": [1], "stop": [""]}, 400, "stop"),
    (C, {"model": "fake", "prompt": [1], "stop": 5}, 400, "stop"),
    (C, {"model": "fake", "prompt": [1], "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (C, {"model": "fake", "prompt": [1], "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    (C, {"model": "fake", "prompt": [1], "ignore_eos": "yes"}, 400, "ignore_eos"),
    (C, {"model": "fake", "prompt": [1], "n": 0}, 400, "n"),
    (C, {"model": "fake", "prompt": [1], "n": "2"}, 400, "n"),
    (C, {"model": "fake", "prompt": [1], "logprobs": 21}, 400, "logprobs"),  # gRPC's bound, 20
    (C, {"model": "fake", "prompt": [1], "logprobs": -1}, 400, "logprobs"),
    (C, {"model": "fake", "prompt": [1], "logprobs": True}, 400, "logprobs"),
    (C, {"model": "fake", "prompt": [1], "logprobs": 0, "echo": True}, 400, "echo"),
    (C, {"model": "fake", "prompt": [1], "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {"model": "fake", "prompt": [1], "stream": "yes"}, 400, "stream"),
    (C, {"model": "fake", "prompt": [1], "user": 5}, 400, "user"),
    (C, {"model": "fake", "prompt": [1], "frobnicate": 1}, 400, "frobnicate"),
    (C, {"model": "fake", "prompt": [1], "presence_penalty": 0.5}, 400, "presence_penalty"),
    (CHAT, {"model": "fake"}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": []}, 400, "messages"),
    (CHAT, {"model": "fake", "messages": ["hi"]}, 400, "messages[0]"),
    (CHAT, {"model": "fake", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"model": "fake", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (
        CHAT,
        {
            "model": "fake",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        400,
        "messages[0].content[0]",
    ),
    (CHAT, {"model": "fake", "messages": OK_CHAT, "top_logprobs": 3}, 400, "top_logprobs"),  # no logprobs
    (CHAT, {"model": "fake", "messages": OK_CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (
        CHAT,
        {"model": "fake", "messages": OK_CHAT, "logprobs": True, "top_logprobs": 1.5},
        400,
        "top_logprobs",
    ),
    (CHAT, {"model": "fake", "messages": OK_CHAT, "logprobs": "yes"}, 400, "logprobs"),
    (
        CHAT,
        {"model": "fake", "messages": OK_CHAT, "max_tokens": 2, "max_completion_tokens": 2},
        400,
        "max_completion_tokens",
    ),
    (CHAT, {"model": "fake", "messages": OK_CHAT, "max_completion_tokens": -2}, 400, "max_completion_tokens"),
    (CHAT, {"model": "fake", "messages": OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"model": "nobody", "messages": OK_CHAT}, 404, "model"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/elsewhere/x"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "fake", "lora_path": "/adapters/x"}, 400, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "", "lora_path": "/adapters/x"}, 400, "lora_name"),
    ("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}, 404, "lora_name"),
    # The fake fleet's "busy-*" names are used by running requests: no re-pointing (gRPC's
    # FAILED_PRECONDITION); "busy-0" points to /adapters/v1 from the fixture below.
    ("/v1/load_lora_adapter", {"lora_name": "busy-0", "lora_path": "/adapters/v2"}, 409, "lora_name"),
]


@pytest.fixture
def busy_adapter(server):
    server["fleet"].adapters["busy-0"] = "/adapters/v1"
    yield
    server["fleet"].adapters.pop("busy-0", None)


def test_bad_requests_get_openai_errors_naming_the_field(server, busy_adapter) -> None:
    failures = []
    for path, body, status, field in BAD_REQUESTS:
        if isinstance(body, bytes):
            reply = server["http"].post(path, content=body, headers={"content-type": "application/json"})
        else:
            reply = server["http"].post(path, json=body)
        error = reply.json().get("error", {}) if reply.headers["content-type"] == "application/json" else {}
        ok = (
            reply.status_code == status
            and set(error) == {"message", "type", "param", "code"}
            and error["param"] == field
            and (field is None or field.split(".")[0].split("[")[0] in error["message"])
            and (field is not None or "JSON" in error["message"])
        )
        if not ok:
            failures.append(f"{path} {body!r}: {reply.status_code} {reply.text}")
    assert len(BAD_REQUESTS) >= 20
    assert not failures, "\n".join(failures)
    assert not server["fleet"].held  # nothing was admitted


def test_same_sampling_values_valid_on_both_apis(server) -> None:
    """A value the gRPC API refuses, the HTTP API refuses too, and the reverse (one validation)."""
    cases = [("max_new_tokens", "max_tokens", v) for v in (0, 1, 3)]
    cases += [("temperature", "temperature", v) for v in (-0.5, 0.0, 2.5)]
    cases += [("top_p", "top_p", v) for v in (0.0, 0.3, 1.0, 1.01)]
    cases += [("top_k", "top_k", v) for v in (-1, 0, 7)]
    cases += [("seed", "seed", v) for v in (-1, 0, 2**62)]
    with Client(server["api"].address, timeout=10) as client:
        for grpc_name, http_name, value in cases:
            try:
                client.generate([1, 2], sampling={"max_new_tokens": 2, grpc_name: value})
                grpc_ok = True
            except ApiError:
                grpc_ok = False
            body = {"model": "fake", "prompt": [1, 2], "max_tokens": 2, http_name: value}
            http_ok = server["http"].post(C, json=body).status_code == 200
            assert grpc_ok == http_ok, (grpc_name, value, grpc_ok, http_ok)


def _sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_completion_stream_shape_with_n_and_usage(server) -> None:
    body = {"model": "alice", "prompt": [[1, 2, 3], [9]], "n": 2, "max_tokens": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    reply = server["http"].post(C, json=body)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(reply.text)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 12,
        "total_tokens": 16,
    }
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chunks[:-1]:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
        choice = chunk["choices"][0]
        assert choice["index"] not in finishes or not finishes[choice["index"]], "a chunk after the finish"
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert finishes == {i: ["length"] for i in range(4)}
    for i, prompt in enumerate([[1, 2, 3], [1, 2, 3], [9], [9]]):
        assert texts[i] == "".join(f"<{t}>" for t in expected_tokens(prompt, "alice", 3))


def test_chat_json_renders_the_template_and_counts_usage(server) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = server["http"].post(CHAT, json={"model": "fake", "messages": messages, "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    out = reply.json()
    prompt = fake_encode("<s><|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\n")
    expected = "".join(f"<{t}>" for t in expected_tokens(prompt, None, 4))
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert out["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 4,
        "total_tokens": len(prompt) + 4,
    }


def test_queue_full_is_429_and_draining_is_503(server) -> None:
    fleet, http = server["fleet"], server["http"]
    with httpx.Client(base_url=server["base"], timeout=20) as other:
        streams = []
        for i in range(fleet.max_running):
            cm = other.stream(
                "POST", C, json={"model": "fake", "prompt": [i + 1], "max_tokens": 500, "stream": True}
            )
            streams.append((cm, cm.__enter__()))
        reply = http.post(C, json={"model": "fake", "prompt": [1], "max_tokens": 1})
        assert reply.status_code == 429, reply.text
        assert (
            reply.json()["error"]["type"] == "rate_limit_error" and "full" in reply.json()["error"]["message"]
        )
        for cm, _ in streams:
            cm.__exit__(None, None, None)  # disconnect: each aborts its request
    assert _wait_until(lambda: not fleet.held)
    lt, api = server["lt"], server["api"]
    lt.run(api.begin_shutdown())
    try:
        for reply in (
            http.post(C, json={"model": "fake", "prompt": [1]}),
            http.get("/health"),
            http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/adapters/a"}),
        ):
            assert reply.status_code == 503 and "shutting down" in reply.json()["error"]["message"]
    finally:
        api.servicer.closing = False
        api.http.state.closing = False
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(server, stream: bool) -> None:
    fleet = server["fleet"]
    before = len(fleet.abort_requested)
    body = {"model": "bob", "prompt": [4, 5], "max_tokens": 2000, "stream": stream}
    with httpx.Client(base_url=server["base"], timeout=1.0) as http:
        if stream:
            with http.stream("POST", C, json=body) as reply:
                assert reply.status_code == 200
                next(reply.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(C, json=body)  # 2000 tokens take 10 s; leave after 1 s
    # fleet.abort was called (what frees the blocks of a real fleet) and the request let go.
    assert _wait_until(lambda: not fleet.held and len(fleet.abort_requested) == before + 1)


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_while_queued_aborts_at_once(server, stream: bool) -> None:
    fleet = server["fleet"]
    before = len(fleet.abort_requested)
    fleet.queue_wait_s = 30.0  # no first token for 30 s: the request waits as if queued
    try:
        body = {"model": "alice", "prompt": [4, 5], "max_tokens": 4, "stream": stream}
        with httpx.Client(base_url=server["base"], timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
            http.post(C, json=body)
        assert _wait_until(lambda: not fleet.held and len(fleet.abort_requested) == before + 1)
    finally:
        fleet.queue_wait_s = 0.0


def test_models_and_adapter_admin(server) -> None:
    http = server["http"]
    reply = http.post("/v1/load_lora_adapter", json={"lora_name": "carol", "lora_path": "/adapters/carol"})
    assert reply.status_code == 200 and "carol" in reply.text
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["fake"]["parent"] is None and cards["fake"]["root"] == "/models/fake"
    assert {n: cards[n]["parent"] for n in ("alice", "bob", "carol")} == dict.fromkeys(
        ("alice", "bob", "carol"), "fake"
    )
    assert cards["carol"]["root"] == "/adapters/carol"
    reply = http.post(C, json={"model": "carol", "prompt": [1], "max_tokens": 2})
    assert reply.status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "carol"}).status_code == 200
    assert "carol" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert http.post(C, json={"model": "carol", "prompt": [1]}).status_code == 404
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/nothing").json()["error"]["message"]


def test_fleet_failures_are_500_before_and_during_a_stream(server) -> None:
    http = server["http"]
    reply = http.post(C, json={"model": "bob", "prompt": [13, 1], "max_tokens": 4})
    assert reply.status_code == 500 and "worker died twice" in reply.json()["error"]["message"]
    reply = http.post(C, json={"model": "bob", "prompt": [66, 1], "max_tokens": 8, "stream": True})
    events = _sse_events(reply.text)
    assert events[-1] == "[DONE]"
    assert "out of memory" in events[-2]["error"]["message"] and events[-2]["error"]["type"] == "server_error"


def test_http_requests_carry_the_http_api_label(server) -> None:
    import urllib.request

    server["http"].post(C, json={"model": "alice", "prompt": [1], "max_tokens": 2})
    server["http"].post(C, json={"model": "alice", "prompt": [1], "max_tokens": 0})
    server["http"].post(C, json={"model": "nobody", "prompt": [1]})
    url = f"http://127.0.0.1:{server['api'].metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and line[0] != "#"
    }
    assert values['lorafleet_requests_total{api="http",status="ok"}'] >= 1
    assert values['lorafleet_requests_total{api="http",status="invalid_argument"}'] >= 1
    assert values['lorafleet_requests_total{api="http",status="not_found"}'] >= 1
    assert values['lorafleet_time_to_first_token_seconds_count{api="http"}'] >= 1
    assert values['lorafleet_in_flight_requests{api="http"}'] == 0
