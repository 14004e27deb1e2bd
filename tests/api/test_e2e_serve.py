"""End to end: `lorafleet serve` (subprocess, local Ray, 2 CPU workers) on the tiny demo model.

Generations through the Python client and through `lorafleet generate` equal the engine's offline
greedy output; errors come back as statuses; a cancelled stream frees its KV blocks; /metrics
reports the traffic; SIGINT shuts the server down with exit code 0.
"""

from __future__ import annotations

import concurrent.futures
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

import grpc
import pytest

from lorafleet.client.grpc_client import ApiError, Client
from lorafleet.worker.types import FinishReason, SamplingParams

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

MAX_NEW = 12
JOBS = [  # (prompt token ids, adapter)
    ((5, 17, 42, 99, 7), "adapter-0"),
    ((300, 12, 8), "adapter-1"),
    ((44, 45, 46, 47, 48, 49, 50), "adapter-2"),
    ((5, 17, 42, 99, 7), None),
    ((9, 9, 9, 9), "adapter-1"),
    ((120, 3, 250, 77), "adapter-0"),
]
TEXT_PROMPT = "The quick brown fox"


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafleet.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line)

    def wait_ready(self, timeout_s: float) -> tuple[str, int]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if " on 127.0.0.1:" in line:
                address = line.split(" on ")[1].split(";")[0].strip()
                metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
                return address, metrics_port
        self.proc.kill()
        raise AssertionError(f"serve did not become ready; stderr:\n{''.join(self.stderr)[-3000:]}")


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafleet.worker.demo_assets import make_demo

    out = tmp_path_factory.mktemp("model")
    make_demo(out, num_adapters=3)
    return out


@pytest.fixture(scope="module")
def offline(demo_model: Path) -> dict:
    """The engine's greedy outputs for JOBS and TEXT_PROMPT, run in this process without Ray."""
    from lorafleet.worker import Engine

    engine = Engine.from_pretrained(demo_model)
    for name in ("adapter-0", "adapter-1", "adapter-2"):
        engine.add_adapter(name, demo_model / "adapters" / name)
    greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    outs = engine.generate([list(p) for p, _ in JOBS], adapters=[a for _, a in JOBS], sampling=greedy)
    text_out = engine.generate([TEXT_PROMPT], adapters=["adapter-2"], sampling=greedy)[0]
    return {"jobs": [o.token_ids for o in outs], "text": text_out}


@pytest.fixture(scope="module")
def server(demo_model: Path) -> Iterator[dict]:
    # Without --ray-address, serve starts its own Ray: a RAY_ADDRESS pointing nowhere must not
    # make it try to join (Ray's own ray.init() would, and hang).
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "RAY_ADDRESS": "127.0.0.1:1"}
    args = ["--model", str(demo_model), "--adapters-dir", str(demo_model / "adapters"), "--workers", "2"]
    args += ["--port", "0", "--metrics-port", "0", "--host", "127.0.0.1", "--drain-timeout-s", "20"]
    args += ["--http-port", "0"]
    serve = ServeProcess(args, env)
    address, metrics_port = serve.wait_ready(180)
    with Client(address, timeout=60) as client:
        client.wait_ready(60)
        end = time.monotonic() + 120
        while client.status().workers_in("active") < 2 and time.monotonic() < end:
            time.sleep(0.5)
    yield {"address": address, "metrics_port": metrics_port, "process": serve, "demo_model": demo_model}
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGINT)
        try:
            serve.proc.wait(90)
        except subprocess.TimeoutExpired:
            serve.proc.kill()
            raise
    assert serve.proc.returncode == 0, "".join(serve.stderr)[-3000:]


def _greedy() -> dict:
    return {"max_new_tokens": MAX_NEW, "temperature": 0.0, "ignore_eos": True}


def test_concurrent_client_generations_equal_offline_greedy(server, offline) -> None:
    with Client(server["address"], timeout=120) as client:
        with concurrent.futures.ThreadPoolExecutor(len(JOBS)) as pool:
            futures = [pool.submit(client.generate, list(p), adapter=a, sampling=_greedy()) for p, a in JOBS]
            results = [f.result(180) for f in futures]
        status = client.status()
    for result, expected, (prompt, _) in zip(results, offline["jobs"], JOBS):
        assert result.token_ids == expected
        assert result.finish_reason is FinishReason.LENGTH
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.generated_tokens == MAX_NEW
    assert status.workers_in("active") == 2


def test_top_logprobs_and_worker_pids_through_the_fleet(server, offline) -> None:
    (prompt, adapter), expected = JOBS[0], offline["jobs"][0]
    sampling = {**_greedy(), "logprobs": True, "top_logprobs": 2}
    with Client(server["address"], timeout=120) as client:
        result = client.generate(list(prompt), adapter=adapter, sampling=sampling)
        status = client.status()
    assert result.token_ids == expected
    assert result.top_logprobs is not None and len(result.top_logprobs) == len(expected)
    for token, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs):
        assert len(top) == 2 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-5
        assert top[1][1] <= top[0][1]
    # The status names each worker's process, so a test or an operator can find it.
    pids = [w.pid for w in status.workers if w.state == "active"]
    assert len(pids) == 2 and all(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_cli_generate_json_equals_offline_greedy(server, offline) -> None:
    def run_cli(prompt_ids: tuple[int, ...], adapter: str | None) -> dict:
        cmd = [sys.executable, "-m", "lorafleet.cli", "generate", "--server", server["address"]]
        cmd += ["--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", str(MAX_NEW)]
        cmd += ["--temperature", "0", "--ignore-eos", "--json"] + (["--adapter", adapter] if adapter else [])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda job: run_cli(*job), JOBS[:3]))
    for out, expected in zip(outs, offline["jobs"][:3]):
        assert tuple(out["token_ids"]) == expected
        assert out["finish_reason"] == "length"


def test_text_prompt_streams_text_like_offline(server, offline) -> None:
    cmd = [sys.executable, "-m", "lorafleet.cli", "generate", "--server", server["address"], "--adapter"]
    cmd += ["adapter-2", "--prompt", TEXT_PROMPT, "--max-new-tokens", str(MAX_NEW), "--temperature", "0"]
    cmd += ["--ignore-eos"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == offline["text"].text + "\n"
    with Client(server["address"], timeout=60) as client:
        result = client.generate(TEXT_PROMPT, adapter="adapter-2", sampling=_greedy())
    assert result.token_ids == offline["text"].token_ids


def test_errors_from_the_real_fleet(server) -> None:
    cases = [
        ({"adapter": "no-such-adapter"}, [1, 2], grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
        ({"sampling": {"max_new_tokens": -1}}, [1, 2], grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        ({"sampling": {"top_p": 2.0}}, [1, 2], grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({}, [], grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        ({}, [7] * 600, grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ]
    with Client(server["address"], timeout=60) as client:
        for kwargs, prompt, code, needle in cases:
            with pytest.raises(ApiError) as info:
                client.generate(prompt, **kwargs)
            assert info.value.code == code, info.value
            assert needle in info.value.details
        with pytest.raises(ApiError) as info:  # inside the adapter root, but not an adapter
            client.register_adapter("broken", str(server["demo_model"] / "adapters"))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "adapter_config.json is missing" in info.value.details
        # Outside the root (--adapters-dir): refused without naming what the path resolves to.
        for path in (str(server["demo_model"]), "/proc/self/cwd", "~/", "/etc"):
            with pytest.raises(ApiError) as info:
                client.register_adapter("probe", path)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "outside the server's adapter roots" in info.value.details
            assert os.getcwd() not in info.value.details and str(Path.home()) not in info.value.details
        with pytest.raises(ApiError) as info:
            client.unregister_adapter("never-registered")
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_cancelled_stream_frees_its_blocks(server) -> None:
    with Client(server["address"], timeout=120) as client:
        idle = client.status()
        assert idle.free_kv_blocks == idle.total_kv_blocks
        stream = client.stream(
            list(range(3, 200)), adapter="adapter-1", sampling={"max_new_tokens": 300, "ignore_eos": True}
        )
        next(stream)
        next(stream)
        busy = client.status()
        assert busy.free_kv_blocks < busy.total_kv_blocks
        stream.close()
        end = time.monotonic() + 30
        while time.monotonic() < end:
            now = client.status()
            if now.free_kv_blocks == now.total_kv_blocks and not any(w.num_running for w in now.workers):
                break
            time.sleep(0.1)
        assert now.free_kv_blocks == now.total_kv_blocks
        assert now.counters.requests_aborted >= 1


def test_metrics_after_traffic(server) -> None:
    with Client(server["address"], timeout=60) as client:
        for prompt, adapter in JOBS[:3]:
            client.generate(list(prompt), adapter=adapter, sampling=_greedy())
    time.sleep(1.5)  # one poll of the fleet status
    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics_port']}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['lorafleet_requests_total{api="grpc",status="ok"}'] >= 3
    assert samples["lorafleet_generated_tokens_total"] >= 3 * MAX_NEW
    assert samples['lorafleet_workers{state="active"}'] == 2
    assert samples['lorafleet_time_to_first_token_seconds_count{api="grpc"}'] >= 3
    assert (
        0
        < samples['lorafleet_time_per_output_token_seconds_sum{api="grpc"}']
        / samples['lorafleet_time_per_output_token_seconds_count{api="grpc"}']
        < 1.0
    )
    assert samples["lorafleet_adapter_loads_total"] >= 1
    assert samples["lorafleet_adapter_cache_misses_total"] >= 1
    assert samples["lorafleet_adapter_load_seconds_count"] >= 1
    assert samples['lorafleet_adapter_requests_total{adapter="adapter-0"}'] >= 1
    kv = [v for k, v in samples.items() if k.startswith("lorafleet_worker_kv_usage_ratio{")]
    assert len(kv) == 2 and all(0.0 <= v <= 1.0 for v in kv)
    batch = [v for k, v in samples.items() if k.startswith("lorafleet_worker_max_batch_size{")]
    assert len(batch) == 2 and all(v >= 1 for v in batch)
    for name in ("lorafleet_migrations_total", "lorafleet_preemptions_total", "lorafleet_queue_length"):
        assert samples[name] >= 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_status_adapters_and_bench(server) -> None:
    address, model = server["address"], server["demo_model"]
    done = _cli("status", "--server", address)
    assert done.returncode == 0, done.stderr
    assert "active" in done.stdout and "queue: 0" in done.stdout
    status = json.loads(_cli("status", "--server", address, "--json").stdout)
    assert len(status["workers"]) == 2 and status["model"]["vocab_size"] == 384
    assert (
        _cli(
            "adapters", "register", "extra", str(model / "adapters" / "adapter-2"), "--server", address
        ).returncode
        == 0
    )
    listed = json.loads(_cli("adapters", "list", "--json", "--server", address).stdout)
    assert listed["extra"] == str(model / "adapters" / "adapter-2")
    assert _cli("adapters", "unregister", "extra", "--server", address).returncode == 0
    done = _cli("adapters", "unregister", "extra", "--server", address)
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    done = _cli(
        "bench",
        "--server",
        address,
        "--synthetic",
        "--popularity",
        "distinct",
        "--rate",
        "20",
        "--duration",
        "1",
        "--output-len",
        "4-8",
        "--json",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["requests"] == report["completed"] > 5
    assert report["adapters_used"] == report["requests"]  # distinct: aliases beyond the 3 real adapters
    assert report["ttft_s"]["p50"] > 0 and report["workers_over_time"]
    assert not any(
        n.startswith("bench-")
        for n in json.loads(_cli("adapters", "list", "--json", "--server", address).stdout)
    )


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_drains_running_requests_then_exits_zero(demo_model: Path, sig: signal.Signals) -> None:
    """Ctrl-C, and SIGTERM as systemd and Kubernetes send it, stop accepting, drain, exit 0."""
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    args = ["--model", str(demo_model), "--adapter", f"solo={demo_model / 'adapters' / 'adapter-0'}"]
    args += ["--workers", "1", "--port", "0", "--metrics-port", "off", "--http-port", "off"]
    args += ["--drain-timeout-s", "60"]
    serve = ServeProcess(args, env)
    address = None  # metrics are off, so the ready line has no metrics URL
    end = time.monotonic() + 180
    while address is None and time.monotonic() < end and serve.proc.poll() is None:
        try:
            line = serve.lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if " on 127.0.0.1:" in line:
            address = line.split(" on ")[1].strip()
    assert address, "".join(serve.stderr)[-3000:]
    try:
        with Client(address, timeout=120) as client:
            stream = client.stream(
                [5, 6, 7], adapter="solo", sampling={"max_new_tokens": 400, "ignore_eos": True}
            )
            chunks = [next(stream)]
            serve.proc.send_signal(sig)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # new calls are refused while the old one drains
                try:
                    client.generate([1, 2], sampling={"max_new_tokens": 1})
                except ApiError as exc:
                    assert exc.code == grpc.StatusCode.UNAVAILABLE
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the draining server still accepted new requests")
            chunks.extend(stream)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 400
        assert serve.proc.wait(90) == 0, "".join(serve.stderr)[-3000:]
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
