"""Prometheus metrics of a `lorafleet serve` process (prometheus-client, own registry).

Two sources feed them: the API servers (gRPC and HTTP) report each finished request through a
`RequestTracker` (`request_finished`; per-request series carry an `api` label, "grpc" or "http"), and a
poller hands the fleet's status snapshot to `observe_cluster` about once a second (gauges, and
counters advanced by the growth of the fleet's cumulative counters).

Per-adapter series are bounded: `AdapterLabels` keeps at most `top_n` adapter names as label values
(the busiest by traffic so far) and folds every other adapter into "other", so 10,000 adapters
cost top_n + 2 series, not 10,000.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from lorafleet.scheduler.status import ClusterStatus
from lorafleet.serving.auth import ApiKeys
from lorafleet.serving.auth_http import bearer_wsgi

OTHER = "other"
BASE = "(base)"  # requests without an adapter; parentheses keep it apart from adapter names
# Requests naming an adapter that is not registered: any string a caller sends must not become a
# label value (a series per typo, or a flood of names taking the top-N slots).
UNREGISTERED = "(unregistered)"

APIS = ("grpc", "http")
# gRPC status names a finished request is counted under ("ok" = completed with STOP or LENGTH); the
# HTTP API counts its requests under the same names (404 -> not_found, 429 -> resource_exhausted, ...).
REQUEST_STATUSES = (
    "ok",
    "cancelled",
    "deadline_exceeded",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
    "unavailable",
    "internal",
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WORKER_STATES = ("starting", "active", "draining", "stopped")


class AdapterLabels:
    """Maps adapter names to a bounded set of label values (sticky top-N by request count).

    An unlabelled adapter takes a free slot, or the slot of the least busy labelled adapter once
    its own count passes that one's; the evicted adapter's series are removed (callback) and its
    later traffic goes to "other". Each series therefore only grows, and the total stays exact.
    """

    def __init__(self, top_n: int, on_evict: Any = None) -> None:
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        self.top_n = top_n
        self._counts: dict[str, int] = {}
        self._labelled: set[str] = set()
        self._on_evict = on_evict
        self._lock = threading.Lock()

    def label_for(self, adapter: str | None) -> str:
        """Count one request of this adapter and return the label value to record it under."""
        if adapter is None:
            return BASE
        with self._lock:
            count = self._counts.get(adapter, 0) + 1
            self._counts[adapter] = count
            if adapter in self._labelled:
                return adapter
            if len(self._labelled) < self.top_n:
                self._labelled.add(adapter)
                return adapter
            if not self._labelled:
                return OTHER
            weakest = min(self._labelled, key=lambda name: (self._counts[name], name))
            if count <= self._counts[weakest]:
                return OTHER
            self._labelled.discard(weakest)
            self._labelled.add(adapter)
        if self._on_evict is not None:
            self._on_evict(weakest)
        return adapter

    def labelled(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._labelled)

    def num_counted(self) -> int:
        """Adapter names with a request count (every name ever labelled or counted)."""
        with self._lock:
            return len(self._counts)


class ServerMetrics:
    """Every metric the server exports, in its own registry (tests build several side by side)."""

    def __init__(self, top_adapters: int = 20, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorafleet_requests", "Requests by API and final (gRPC) status", ["api", "status"], registry=r
        )
        for api in APIS:
            for status in REQUEST_STATUSES:
                self.requests.labels(api=api, status=status)
        self.adapter_requests = Counter(
            "lorafleet_adapter_requests",
            "Requests per adapter (top adapters by traffic; the rest under 'other')",
            ["adapter"],
            registry=r,
        )
        self.adapter_tokens = Counter(
            "lorafleet_adapter_generated_tokens",
            "Generated tokens per adapter (top adapters by traffic; the rest under 'other')",
            ["adapter"],
            registry=r,
        )
        self.adapter_requests.labels(adapter=OTHER)
        self.adapter_tokens.labels(adapter=OTHER)
        self.adapter_labels = AdapterLabels(top_adapters, on_evict=self._drop_adapter_series)
        self.generated_tokens = Counter("lorafleet_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.in_flight = Gauge(
            "lorafleet_in_flight_requests", "Generation requests open now", ["api"], registry=r
        )
        self.ttft = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "From receiving a request to its first token",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorafleet_time_per_output_token_seconds",
            "Mean gap between generated tokens after the first, per request",
            ["api"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lorafleet_request_duration_seconds",
            "From receiving a request to its last message",
            ["api"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for api in APIS:
            for metric in (self.in_flight, self.ttft, self.tpot, self.e2e):
                metric.labels(api=api)
        self.queue_length = Gauge("lorafleet_queue_length", "Requests waiting for a worker", registry=r)
        self.workers = Gauge("lorafleet_workers", "Workers by state", ["state"], registry=r)
        for state in WORKER_STATES:
            self.workers.labels(state=state)
        self.worker_batch = Gauge(
            "lorafleet_worker_batch_size", "Sequences running on the worker", ["worker"], registry=r
        )
        self.worker_max_batch = Gauge(
            "lorafleet_worker_max_batch_size", "The worker's batch size limit", ["worker"], registry=r
        )
        self.worker_kv_free = Gauge(
            "lorafleet_worker_kv_free_blocks", "Free KV-cache blocks on the worker", ["worker"], registry=r
        )
        self.worker_kv_usage = Gauge(
            "lorafleet_worker_kv_usage_ratio",
            "Fraction of the worker's KV blocks in use",
            ["worker"],
            registry=r,
        )
        self.migrations = Counter("lorafleet_migrations", "Sequences moved between workers", registry=r)
        self.preemptions = Counter("lorafleet_preemptions", "Sequences preempted for KV space", registry=r)
        self.adapter_loads = Counter("lorafleet_adapter_loads", "Adapter loads into worker slots", registry=r)
        # Faults: a worker whose report stream failed (killed, node lost, engine crash), each request
        # it owned that went back to the queue to resume elsewhere, and a worker that did not start.
        self.worker_deaths = Counter(
            "lorafleet_worker_deaths", "Workers lost while serving (killed, node lost, crash)", registry=r
        )
        self.fault_resumes = Counter(
            "lorafleet_fault_resumes",
            "Requests resumed on another worker after their worker died",
            registry=r,
        )
        self.worker_start_failures = Counter(
            "lorafleet_worker_start_failures", "Worker starts that failed or timed out", registry=r
        )
        self.adapter_hits = Counter(
            "lorafleet_adapter_cache_hits", "Requests whose adapter was already resident", registry=r
        )
        self.adapter_misses = Counter(
            "lorafleet_adapter_cache_misses", "Requests whose adapter had to be loaded", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "lorafleet_adapter_load_seconds", "Time to load one adapter", buckets=_LOAD_BUCKETS, registry=r
        )
        # Set by the server: whether an adapter name is registered (None: every name is).
        self.is_registered: Callable[[str], bool] | None = None
        self._last_counters: dict[str, float] = {}
        self._known_workers: set[str] = set()
        self._lock = threading.Lock()

    def bookkeeping_sizes(self) -> dict[str, int]:
        """Sizes of what the metrics keep per name (soak leak checks)."""
        return {
            "metric_samples": sum(len(m.samples) for m in self.registry.collect()),
            "adapter_names_counted": self.adapter_labels.num_counted(),
            "known_workers": len(self._known_workers),
        }

    # ---------------------------------------------------------------- per request

    def request_admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)

    def request_finished(
        self,
        *,
        api: str = "grpc",
        adapter: str | None,
        status: str,
        generated_tokens: int,
        duration_s: float,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
    ) -> None:
        if status not in REQUEST_STATUSES:
            raise ValueError(f"unknown request status {status!r} (known: {', '.join(REQUEST_STATUSES)})")
        if api not in APIS:
            raise ValueError(f"unknown api {api!r} (known: {', '.join(APIS)})")
        self.requests.labels(api=api, status=status).inc()
        if adapter is not None and self.is_registered is not None and not self.is_registered(adapter):
            label = UNREGISTERED
        else:
            label = self.adapter_labels.label_for(adapter)
        self.adapter_requests.labels(adapter=label).inc()
        if generated_tokens:
            self.adapter_tokens.labels(adapter=label).inc(generated_tokens)
            self.generated_tokens.inc(generated_tokens)
        self.e2e.labels(api=api).observe(duration_s)
        if ttft_s is not None:
            self.ttft.labels(api=api).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.labels(api=api).observe(tpot_s)

    def _drop_adapter_series(self, adapter: str) -> None:
        for metric in (self.adapter_requests, self.adapter_tokens):
            with contextlib.suppress(KeyError):
                metric.remove(adapter)

    # ---------------------------------------------------------------- cluster snapshot

    def observe_cluster(self, status: ClusterStatus) -> None:
        """Refresh gauges from the fleet's status; advance counters by how much the fleet's grew."""
        with self._lock:
            self.queue_length.set(status.queue_len)
            by_state = dict.fromkeys(WORKER_STATES, 0)
            seen: set[str] = set()
            for w in status.workers:
                state = w.state
                by_state[state] = by_state.get(state, 0) + 1
                wid = str(w.worker_id)
                seen.add(wid)
                self.worker_batch.labels(worker=wid).set(w.num_running)
                self.worker_max_batch.labels(worker=wid).set(w.max_batch_size)
                self.worker_kv_free.labels(worker=wid).set(w.free_kv_blocks)
                used = 1.0 - w.free_kv_blocks / w.total_kv_blocks if w.total_kv_blocks else 0.0
                self.worker_kv_usage.labels(worker=wid).set(used)
            for state, n in by_state.items():
                self.workers.labels(state=state).set(n)
            for gone in self._known_workers - seen:
                for gauge in (
                    self.worker_batch,
                    self.worker_max_batch,
                    self.worker_kv_free,
                    self.worker_kv_usage,
                ):
                    with contextlib.suppress(KeyError):
                        gauge.remove(gone)
            self._known_workers = seen
            c = status.counters
            for name, counter, value in (
                ("migrations", self.migrations, c.migrations),
                ("preemptions", self.preemptions, c.preemptions),
                ("adapter_loads", self.adapter_loads, c.adapter_loads),
                ("adapter_cache_hits", self.adapter_hits, c.adapter_cache_hits),
                ("adapter_cache_misses", self.adapter_misses, c.adapter_cache_misses),
                ("worker_deaths", self.worker_deaths, c.worker_deaths),
                ("resumed_after_fault", self.fault_resumes, c.resumed_after_fault),
                ("worker_start_failures", self.worker_start_failures, c.worker_start_failures),
            ):
                # A fleet counter can only shrink if it restarted; then count from its new value.
                grown = value - self._last_counters.get(name, 0)
                if grown > 0:
                    counter.inc(grown)
                self._last_counters[name] = value
            # The fleet keeps its latest load times (up to 1,024); the ones new since the last
            # snapshot are the last `adapter_load_count` growth of them.
            new_loads = c.adapter_load_count - self._last_counters.get("adapter_load_count", 0)
            if new_loads > 0 and status.recent_adapter_load_seconds:
                for seconds in status.recent_adapter_load_seconds[-new_loads:]:
                    self.adapter_load_seconds.observe(seconds)
            self._last_counters["adapter_load_count"] = c.adapter_load_count

    # ---------------------------------------------------------------- exposition

    def serve(self, host: str, port: int, keys: ApiKeys | None = None) -> tuple[Any, int]:
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, bound port).

        prometheus_client's own WSGI app, served here rather than by `start_http_server` so that a
        bearer check (any role) can wrap it when auth is on.
        """
        app = make_wsgi_app(self.registry)
        if keys is not None:
            app = bearer_wsgi(app, keys)
        server_class = _MetricsServerV6 if ":" in host else _MetricsServer
        server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server, server.server_port


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress must not keep the process alive


class _MetricsServerV6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # every scrape would print a line on stderr


class RequestTracker:
    """Times one generation request of one API and reports it to the metrics exactly once."""

    def __init__(self, metrics: ServerMetrics | None, api: str, adapter: str | None, arrival: float) -> None:
        self.metrics = metrics
        self.api = api
        self.adapter = adapter
        self.arrival = arrival
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.generated = 0
        self.prompt_tokens = 0
        self.reported = False

    def tokens(self, n: int, now: float) -> None:
        if n and self.first_token_at is None:
            self.first_token_at = now
        if n:
            self.last_token_at = now
        self.generated += n

    @property
    def ttft_s(self) -> float:
        # No token (e.g. aborted before the first one): 0 rather than a made-up TTFT.
        return 0.0 if self.first_token_at is None else self.first_token_at - self.arrival

    def finish(self, status: str, now: float) -> None:
        if self.reported or self.metrics is None:
            self.reported = True
            return
        self.reported = True
        tpot = None
        if self.generated > 1 and self.first_token_at is not None and self.last_token_at is not None:
            tpot = (self.last_token_at - self.first_token_at) / (self.generated - 1)
        self.metrics.request_finished(
            api=self.api,
            adapter=self.adapter,
            status=status,
            generated_tokens=self.generated,
            duration_s=now - self.arrival,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            tpot_s=tpot,
        )
