"""Prometheus metrics: the bounded adapter labels, and /metrics after traffic through a server."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.client.grpc_client import ApiError, Client
from lorafleet.scheduler.status import ClusterStatus, FleetCounters, WorkerStatus
from lorafleet.serving.metrics import OTHER, AdapterLabels, ServerMetrics

EXPECTED_FAMILIES = {
    "lorafleet_requests": "counter",
    "lorafleet_adapter_requests": "counter",
    "lorafleet_adapter_generated_tokens": "counter",
    "lorafleet_generated_tokens": "counter",
    "lorafleet_prompt_tokens": "counter",
    "lorafleet_in_flight_requests": "gauge",
    "lorafleet_queue_length": "gauge",
    "lorafleet_time_to_first_token_seconds": "histogram",
    "lorafleet_time_per_output_token_seconds": "histogram",
    "lorafleet_request_duration_seconds": "histogram",
    "lorafleet_workers": "gauge",
    "lorafleet_worker_batch_size": "gauge",
    "lorafleet_worker_max_batch_size": "gauge",
    "lorafleet_worker_kv_free_blocks": "gauge",
    "lorafleet_worker_kv_usage_ratio": "gauge",
    "lorafleet_migrations": "counter",
    "lorafleet_preemptions": "counter",
    "lorafleet_adapter_loads": "counter",
    "lorafleet_adapter_cache_hits": "counter",
    "lorafleet_adapter_cache_misses": "counter",
    "lorafleet_adapter_load_seconds": "histogram",
    "lorafleet_worker_deaths": "counter",
    "lorafleet_fault_resumes": "counter",
    "lorafleet_worker_start_failures": "counter",
}


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{family: {(sample name, sorted labels): value}} from the live endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(family.name, {})
        samples["__type__",] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict, family: str, sample: str, **labels: str) -> float:
    return metrics[family][(sample, tuple(sorted(labels.items())))]


def test_adapter_labels_stay_bounded_and_follow_traffic() -> None:
    evicted: list[str] = []
    labels = AdapterLabels(3, on_evict=evicted.append)
    for i in range(10_000):
        labels.label_for(f"tail-{i}")
    assert len(labels.labelled()) == 3
    for _ in range(5):
        for name in ("hot-a", "hot-b", "hot-c"):
            label = labels.label_for(name)
    assert label == "hot-c"
    assert labels.labelled() == {"hot-a", "hot-b", "hot-c"}
    assert len(evicted) == 3
    assert labels.label_for("tail-5") == OTHER
    assert labels.label_for(None) == "(base)"
    with pytest.raises(ValueError, match="top_n"):
        AdapterLabels(-1)


def test_per_adapter_series_are_bounded_and_sum_exactly() -> None:
    metrics = ServerMetrics(top_adapters=5)
    for i in range(2_000):
        metrics.request_finished(adapter=f"a{i % 500}", status="ok", generated_tokens=2, duration_s=0.1)
    series = {
        labels["adapter"]: s.value
        for family in metrics.registry.collect()
        if family.name == "lorafleet_adapter_requests"
        for s in family.samples
        if s.name.endswith("_total")
        for labels in [s.labels]
    }
    assert len(series) <= 5 + 1
    assert sum(series.values()) == 2_000
    with pytest.raises(ValueError, match="unknown request status"):
        metrics.request_finished(adapter=None, status="weird", generated_tokens=0, duration_s=0.0)


def test_cluster_counters_advance_by_growth_and_workers_come_and_go() -> None:
    metrics = ServerMetrics()

    def status(migrations: int, workers: tuple[str, ...], loads: tuple[float, ...]) -> ClusterStatus:
        ws = tuple(WorkerStatus(w, "active", 1, 8, 30, 40, ()) for w in workers)
        counters = FleetCounters(migrations=migrations, adapter_load_count=len(loads))
        return ClusterStatus(ws, queue_len=2, counters=counters, recent_adapter_load_seconds=loads)

    metrics.observe_cluster(status(3, ("w0", "w1"), (0.01,)))
    metrics.observe_cluster(status(5, ("w1",), (0.01, 0.02, 0.03)))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in metrics.registry.collect()
        for s in f.samples
    }
    assert samples[("lorafleet_migrations_total", ())] == 5
    assert samples[("lorafleet_adapter_load_seconds_count", ())] == 3
    assert samples[("lorafleet_adapter_load_seconds_sum", ())] == pytest.approx(0.06)
    assert ("lorafleet_worker_batch_size", (("worker", "w0"),)) not in samples
    assert samples[("lorafleet_worker_kv_usage_ratio", (("worker", "w1"),))] == pytest.approx(0.25)
    assert samples[("lorafleet_workers", (("state", "active"),))] == 1
    assert samples[("lorafleet_queue_length", ())] == 2


def test_fault_counters_follow_the_fleets() -> None:
    metrics = ServerMetrics()

    def observe(deaths: int, resumes: int, start_failures: int) -> dict[str, float]:
        counters = FleetCounters(
            worker_deaths=deaths, resumed_after_fault=resumes, worker_start_failures=start_failures
        )
        metrics.observe_cluster(ClusterStatus((), queue_len=0, counters=counters))
        return {
            s.name: s.value
            for f in metrics.registry.collect()
            for s in f.samples
            if s.name.endswith("_total")
        }

    before = observe(0, 0, 0)
    assert before["lorafleet_worker_deaths_total"] == 0
    after = observe(1, 3, 2)
    assert after["lorafleet_worker_deaths_total"] == 1
    assert after["lorafleet_fault_resumes_total"] == 3
    assert after["lorafleet_worker_start_failures_total"] == 2
    later = observe(2, 3, 2)  # a second death with nothing to resume
    assert later["lorafleet_worker_deaths_total"] == 2 and later["lorafleet_fault_resumes_total"] == 3


def test_metrics_endpoint_after_traffic(fake_server_with_metrics) -> None:
    api, fleet, _ = fake_server_with_metrics
    assert api.metrics_port
    with Client(api.address, timeout=10) as client:
        for i in range(3):
            client.generate([1, 2, i], adapter="alice", sampling={"max_new_tokens": 4})
        client.generate([7, 7], sampling={"max_new_tokens": 2})
        with pytest.raises(ApiError):
            client.generate([1], adapter="nobody")
        with pytest.raises(ApiError):  # refused for its sampling, and naming no registered adapter
            client.generate([1], adapter="typo-adapter", sampling={"top_p": 2.0})
        stream = client.stream([1, 2], sampling={"max_new_tokens": 500})
        next(stream)
        stream.close()
    fleet.migrations = 2
    end = time.monotonic() + 10
    while True:  # the status poller runs about once a second
        metrics = scrape(api.metrics_port)
        if (
            value(metrics, "lorafleet_migrations", "lorafleet_migrations_total") == 2
            or time.monotonic() > end
        ):
            break
        time.sleep(0.2)
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in metrics, f"{name} missing from /metrics"
        assert metrics[name]["__type__",] == kind, name
    assert value(metrics, "lorafleet_requests", "lorafleet_requests_total", api="grpc", status="ok") == 4
    assert (
        value(metrics, "lorafleet_requests", "lorafleet_requests_total", api="grpc", status="not_found") == 1
    )
    assert (
        value(metrics, "lorafleet_requests", "lorafleet_requests_total", api="grpc", status="cancelled") == 1
    )
    assert (
        value(metrics, "lorafleet_adapter_requests", "lorafleet_adapter_requests_total", adapter="alice") == 3
    )
    # Names that are not registered never become label values.
    unregistered = value(
        metrics, "lorafleet_adapter_requests", "lorafleet_adapter_requests_total", adapter="(unregistered)"
    )
    assert unregistered == 2
    labels = {key for family in metrics.values() for key in family if isinstance(key, tuple)}
    assert not any("nobody" in str(key) or "typo-adapter" in str(key) for key in labels)
    assert value(metrics, "lorafleet_generated_tokens", "lorafleet_generated_tokens_total") >= 3 * 4 + 2
    # Admitted prompts only: 3 x [1, 2, i], [7, 7] and the cancelled [1, 2]; not the unknown adapter's.
    assert value(metrics, "lorafleet_prompt_tokens", "lorafleet_prompt_tokens_total") == 3 * 3 + 2 + 2
    assert (
        value(
            metrics,
            "lorafleet_adapter_generated_tokens",
            "lorafleet_adapter_generated_tokens_total",
            adapter="alice",
        )
        == 12
    )
    ttft_count = value(
        metrics,
        "lorafleet_time_to_first_token_seconds",
        "lorafleet_time_to_first_token_seconds_count",
        api="grpc",
    )
    assert ttft_count == 5  # 4 completed + the cancelled one that got a first token
    ttft_sum = value(
        metrics,
        "lorafleet_time_to_first_token_seconds",
        "lorafleet_time_to_first_token_seconds_sum",
        api="grpc",
    )
    assert 0 < ttft_sum / ttft_count < 5
    tpot_count = value(
        metrics,
        "lorafleet_time_per_output_token_seconds",
        "lorafleet_time_per_output_token_seconds_count",
        api="grpc",
    )
    assert tpot_count >= 4
    assert (
        value(
            metrics,
            "lorafleet_request_duration_seconds",
            "lorafleet_request_duration_seconds_count",
            api="grpc",
        )
        == 7  # every request that reached the server, the two refused ones included
    )
    assert (
        value(
            metrics, "lorafleet_requests", "lorafleet_requests_total", api="grpc", status="invalid_argument"
        )
        == 1
    )
    assert value(metrics, "lorafleet_migrations", "lorafleet_migrations_total") == 2
    assert value(metrics, "lorafleet_workers", "lorafleet_workers", state="active") == 1
    assert (
        value(metrics, "lorafleet_worker_kv_usage_ratio", "lorafleet_worker_kv_usage_ratio", worker="w0")
        == 0.0
    )
    assert (
        value(metrics, "lorafleet_worker_max_batch_size", "lorafleet_worker_max_batch_size", worker="w0") == 4
    )
    assert (
        value(metrics, "lorafleet_adapter_load_seconds", "lorafleet_adapter_load_seconds_count")
        == fleet.load_count
    )
    assert value(metrics, "lorafleet_in_flight_requests", "lorafleet_in_flight_requests", api="grpc") == 0
    assert value(metrics, "lorafleet_requests", "lorafleet_requests_total", api="http", status="ok") == 0
