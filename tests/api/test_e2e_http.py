"""End to end over HTTP: `lorafleet serve` (subprocess, local Ray, CPU, demo model) and the official
`openai` package, sync and async, streaming and not.

Greedy outputs equal the engine's offline `generate` token for token (token ids come back through
vLLM's `return_tokens_as_token_ids` extension), for several adapters and the base model in one
concurrent batch; usage equals the token counts; a disconnected stream frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorafleet.client.grpc_client import Client
from lorafleet.worker.types import SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("ray")
pytestmark = pytest.mark.slow

MAX_NEW = 10
JOBS = [  # (prompt: token ids or text, model: adapter name or None = base, stream?)
    ([5, 17, 42, 99, 7], "adapter-0", False),
    ([300, 12, 8], "adapter-1", True),
    ("The quick brown fox", "adapter-2", True),
    ([5, 17, 42, 99, 7], None, False),
    ("Once upon a time", None, True),
    ([9, 9, 9, 9], "adapter-1", False),
    ([300, 12, 8], None, True),
]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
GREEDY = {"temperature": 0.0, "max_tokens": MAX_NEW, "logprobs": 0}
EXTRA = {"return_tokens_as_token_ids": True, "ignore_eos": True}


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafleet.worker.demo_assets import make_demo

    out = tmp_path_factory.mktemp("model")
    make_demo(out, num_adapters=3)
    return out


def _chat_prompt_ids(model_dir: Path) -> list[int]:
    from lorafleet.serving.chat_template import ChatTemplate
    from lorafleet.worker.tokenizer import Tokenizer

    template = ChatTemplate.from_dir(model_dir)
    assert template is not None, "make_demo wrote no chat template"
    return Tokenizer.from_dir(model_dir).encode(template.render(CHAT), add_special_tokens=False)


@pytest.fixture(scope="module")
def offline(demo_model: Path) -> dict:
    from lorafleet.worker import Engine

    engine = Engine.from_pretrained(demo_model)
    for name in ("adapter-0", "adapter-1", "adapter-2"):
        engine.add_adapter(name, demo_model / "adapters" / name)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    prompts = [p for p, _, _ in JOBS] + [_chat_prompt_ids(demo_model)]
    outs = engine.generate(prompts, adapters=[m for _, m, _ in JOBS] + ["adapter-0"], sampling=greedy)
    return {"jobs": outs[:-1], "chat": outs[-1]}


@pytest.fixture(scope="module")
def server(demo_model: Path) -> Iterator[dict]:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    cmd = [sys.executable, "-m", "lorafleet.cli", "serve", "--model", str(demo_model)]
    cmd += ["--adapters-dir", str(demo_model / "adapters"), "--workers", "1", "--port", "0"]
    cmd += ["--http-port", "0", "--metrics-port", "0", "--drain-timeout-s", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    errors: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [errors.append(x) for x in proc.stderr], daemon=True).start()
    ready = None
    end = time.monotonic() + 180
    while ready is None and time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(queue.Empty):
            line = lines.get(timeout=0.5)
            if "OpenAI API at " in line:
                ready = line
    if ready is None:
        proc.kill()
        raise AssertionError("serve did not start:\n" + "".join(errors)[-3000:])
    # "lorafleet: serving M on HOST:PORT; OpenAI API at http://HOST:PORT/v1; metrics at http://..."
    grpc_address = ready.split(" on ")[1].split(";")[0].strip()
    base_url = ready.split("OpenAI API at ")[1].split(";")[0].strip()
    metrics_url = ready.split("metrics at ")[1].strip()
    with Client(grpc_address, timeout=60) as client:
        client.wait_ready(60)
    yield {
        "grpc": grpc_address,
        "base_url": base_url,
        "metrics": metrics_url,
        "model": demo_model.name,
        "proc": proc,
    }
    proc.send_signal(signal.SIGINT)  # no-op when the last test already stopped it
    try:
        assert proc.wait(90) == 0, "".join(errors)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def _async_client(server: dict):
    return openai.AsyncOpenAI(base_url=server["base_url"], api_key="unused", max_retries=0)


def _ids(tokens: list[str]) -> tuple[int, ...]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return tuple(int(t.split(":", 1)[1]) for t in tokens)


async def _complete(client, model: str, prompt, stream: bool) -> tuple[tuple[int, ...], str, object]:
    if not stream:
        out = await client.completions.create(model=model, prompt=prompt, **GREEDY, extra_body=EXTRA)
        choice = out.choices[0]
        assert choice.finish_reason == "length"
        return _ids(choice.logprobs.tokens), choice.text, out.usage
    chunks = await client.completions.create(
        model=model,
        prompt=prompt,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
        extra_body=EXTRA,
    )
    tokens, text, usage, finishes = [], "", None, []
    async for chunk in chunks:
        if chunk.usage is not None:
            assert not chunk.choices and usage is None, "usage twice or with choices"
            usage = chunk.usage
            continue
        assert usage is None, "a chunk after the usage chunk"
        (choice,) = chunk.choices
        tokens += choice.logprobs.tokens if choice.logprobs else []
        text += choice.text
        if choice.finish_reason:
            finishes.append(choice.finish_reason)
    assert finishes == ["length"]
    return _ids(tokens), text, usage


def test_async_concurrent_completions_equal_offline_greedy(server, offline) -> None:
    async def run() -> list:
        async with openai.AsyncOpenAI(base_url=server["base_url"], api_key="unused", max_retries=0) as client:
            return await asyncio.gather(
                *(
                    _complete(client, model or server["model"], prompt, stream)
                    for prompt, model, stream in JOBS
                )
            )

    results = asyncio.run(run())
    for (ids, text, usage), expected, (prompt, model, _) in zip(results, offline["jobs"], JOBS):
        assert ids == expected.token_ids, (model, prompt)
        assert text == expected.text
        assert usage.prompt_tokens == len(expected.prompt_token_ids)
        assert usage.completion_tokens == MAX_NEW and usage.total_tokens == usage.prompt_tokens + MAX_NEW


def test_sync_client_completions_and_batched_prompts(server, offline) -> None:
    client = openai.OpenAI(base_url=server["base_url"], api_key="unused", max_retries=0)
    out = client.completions.create(
        model=server["model"], prompt=[JOBS[3][0], JOBS[6][0]], **GREEDY, extra_body=EXTRA
    )
    assert [_ids(c.logprobs.tokens) for c in out.choices] == [offline["jobs"][i].token_ids for i in (3, 6)]
    assert out.usage.completion_tokens == 2 * MAX_NEW
    stream = client.completions.create(
        model="adapter-2", prompt=JOBS[2][0], stream=True, temperature=0, max_tokens=MAX_NEW, extra_body=EXTRA
    )
    assert "".join(c.choices[0].text for c in stream) == offline["jobs"][2].text
    echoed = client.completions.create(
        model="adapter-2", prompt=JOBS[2][0], echo=True, max_tokens=2, temperature=0
    )
    assert echoed.choices[0].text.startswith(JOBS[2][0])


def test_chat_sync_and_async_streaming_equal_offline(server, offline) -> None:
    expected = offline["chat"]
    client = openai.OpenAI(base_url=server["base_url"], api_key="unused", max_retries=0)
    out = client.chat.completions.create(
        model="adapter-0", messages=CHAT, temperature=0, max_tokens=MAX_NEW, logprobs=True, extra_body=EXTRA
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text
    assert _ids([t.token for t in out.choices[0].logprobs.content]) == expected.token_ids
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == MAX_NEW

    async def stream() -> tuple[list, str]:
        async with openai.AsyncOpenAI(
            base_url=server["base_url"], api_key="unused", max_retries=0
        ) as aclient:
            chunks = await aclient.chat.completions.create(
                model="adapter-0",
                messages=CHAT,
                temperature=0,
                max_completion_tokens=MAX_NEW,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            return [c async for c in chunks]

    chunks = asyncio.run(stream())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage.completion_tokens == MAX_NEW and not chunks[-1].choices


def test_errors_through_the_openai_client(server) -> None:
    client = openai.OpenAI(base_url=server["base_url"], api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-adapter", prompt="hi")
    assert info.value.status_code == 404 and "no-such-adapter" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="adapter-0", prompt="hi", top_p=2.0)
    assert info.value.body["param"] == "top_p" and "top_p" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="adapter-0", prompt=[7] * 600)
    assert "context" in info.value.message
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {server["model"], "adapter-0", "adapter-1", "adapter-2"}
    assert all(models[f"adapter-{i}"].parent == server["model"] for i in range(3))


def _top_ids(top: dict) -> list[int]:
    return list(_ids(list(top)))


def test_top_logprobs_through_http_equal_grpc(server, offline) -> None:
    """OpenAI's shapes: completions `logprobs: N`, chat `logprobs: true, top_logprobs: N`, streamed
    and not; the alternatives are those gRPC gives for the same greedy request."""
    (prompt, model, _), expected = JOBS[0], offline["jobs"][0]
    sampling = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}
    with Client(server["grpc"], timeout=60) as grpc:
        ref = grpc.generate(
            list(prompt), adapter=model, sampling={**sampling, "logprobs": True, "top_logprobs": 3}
        )
    assert ref.token_ids == expected.token_ids and ref.top_logprobs is not None
    client = openai.OpenAI(base_url=server["base_url"], api_key="unused", max_retries=0)
    asked = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": MAX_NEW, "logprobs": 3}
    lp = client.completions.create(**asked, extra_body=EXTRA).choices[0].logprobs
    assert _ids(lp.tokens) == expected.token_ids and len(lp.text_offset) == MAX_NEW
    assert [_top_ids(top) for top in lp.top_logprobs] == [[t for t, _ in top] for top in ref.top_logprobs]
    for top, want in zip(lp.top_logprobs, ref.top_logprobs):
        assert list(top.values()) == pytest.approx([v for _, v in want], abs=1e-4)
    chunks = client.completions.create(**asked, stream=True, extra_body=EXTRA)
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs
    ]
    assert [_top_ids(t) for t in streamed] == [_top_ids(t) for t in lp.top_logprobs]

    chat = {"model": "adapter-0", "messages": CHAT, "temperature": 0, "max_tokens": MAX_NEW}
    chat.update(logprobs=True, top_logprobs=2)
    content = client.chat.completions.create(**chat, extra_body=EXTRA).choices[0].logprobs.content
    assert _ids([c.token for c in content]) == offline["chat"].token_ids
    for c in content:  # greedy: the chosen token is the first alternative
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob, abs=1e-5)
        assert c.top_logprobs[1].logprob <= c.top_logprobs[0].logprob
        assert c.bytes == list(c.token.encode()) and c.top_logprobs[1].bytes is not None
    parts = client.chat.completions.create(**chat, stream=True, extra_body=EXTRA)
    pieces = [c for p in parts if p.choices and p.choices[0].logprobs for c in p.choices[0].logprobs.content]
    assert [[a.token for a in c.top_logprobs] for c in pieces] == [
        [a.token for a in c.top_logprobs] for c in content
    ]

    for call, bad, field in [
        (client.chat.completions.create, {**chat, "top_logprobs": 21}, "top_logprobs"),
        (client.chat.completions.create, {**chat, "logprobs": False}, "top_logprobs"),
        (client.completions.create, {**asked, "logprobs": 21}, "logprobs"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            call(**bad)
        assert info.value.body["param"] == field and field in info.value.message


def test_disconnected_stream_frees_its_kv_blocks_and_metrics_say_http(server) -> None:
    body = {"model": "adapter-1", "prompt": list(range(3, 200)), "max_tokens": 300, "stream": True}
    body["ignore_eos"] = True
    with Client(server["grpc"], timeout=60) as grpc_client:
        idle = grpc_client.status()
        base = server["base_url"].removesuffix("/v1")
        with (
            httpx.Client(base_url=base, timeout=60) as http,
            http.stream("POST", "/v1/completions", json=body) as reply,
        ):
            next(reply.iter_lines())
            busy = grpc_client.status()
        assert busy.free_kv_blocks < busy.total_kv_blocks == idle.total_kv_blocks
        end = time.monotonic() + 30
        while time.monotonic() < end:
            now = grpc_client.status()
            if now.free_kv_blocks == now.total_kv_blocks and not any(w.num_running for w in now.workers):
                break
            time.sleep(0.1)
        assert now.free_kv_blocks == now.total_kv_blocks
        assert now.counters.requests_aborted >= 1
    with urllib.request.urlopen(server["metrics"], timeout=10) as reply:
        text = reply.read().decode()
    values = {
        ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln[:1] not in "#"
    }
    assert values['lorafleet_requests_total{api="http",status="ok"}'] >= len(JOBS)
    assert values['lorafleet_requests_total{api="http",status="cancelled"}'] >= 1


def test_cli_bench_through_http(server) -> None:
    cmd = [sys.executable, "-m", "lorafleet.cli", "bench", "--server", server["grpc"], "--http"]
    cmd += [server["base_url"], "--synthetic", "--popularity", "uniform", "--rate", "20", "--duration", "1"]
    cmd += ["--output-len", "4-8", "--json", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] == report["completed"] > 5
    assert report["generated_tokens"] >= 4 * report["requests"]
    assert 0 < report["ttft_s"]["p50"] <= report["e2e_s"]["p50"]
    # Measured for every request, but it may honestly be 0: a worker that outruns the head merges
    # several steps into one report, and their chunks then share one socket read on the client.
    assert all(report["tpot_s"][q] is not None and report["tpot_s"][q] >= 0 for q in ("p50", "p90", "p99"))


def test_zz_sigint_drains_http_streams_and_refuses_new_calls(server) -> None:
    """Last in the module: it stops the shared server."""
    base = server["base_url"].removesuffix("/v1")
    body = {"model": "adapter-0", "prompt": [5, 6, 7], "max_tokens": 200, "stream": True, "ignore_eos": True}
    refuse = {"model": "adapter-0", "prompt": [1], "max_tokens": 1}
    with (
        httpx.Client(base_url=base, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as reply,
    ):
        lines = reply.iter_lines()
        first = next(lines)
        server["proc"].send_signal(signal.SIGINT)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            refused = http.post("/v1/completions", json=refuse)
            if refused.status_code == 503:
                break
            time.sleep(0.05)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        assert http.get("/health").status_code == 503
        rest = [first, *lines]
    events = [ln[len("data: ") :] for ln in rest if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server["proc"].wait(90) == 0
