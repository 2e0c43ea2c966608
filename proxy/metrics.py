"""Prometheus metrics at /metrics: what the proxy served, refused and spent, and how fast.

One `Metrics` per process. With several workers (WORKERS > 1), `app.py` points
PROMETHEUS_MULTIPROC_DIR at a directory shared by the workers before any of them starts, and a
scrape served by any worker reads them all (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
KEY_STATES = ("active", "revoked", "over_quota", "rate_limited", "unchecked")

KeyStates = Callable[[], dict[str, dict]]  # service -> the pool's snapshot counts
QueueView = Callable[[], dict[str, dict[str, dict]]]  # the queue's snapshot: service -> family -> line


class Metrics:
    """The proxy's instruments. `observe` is called once per finished proxy request."""

    def __init__(
        self, *, multiprocess: bool = False, key_states: KeyStates | None = None, queue: QueueView | None = None
    ) -> None:
        self.multiprocess = multiprocess
        # In multiprocess mode, values live in files and the scrape registry reads them; the
        # instruments are created unregistered. In a single process they live in `registry`.
        self.registry = CollectorRegistry()
        target = None if multiprocess else self.registry
        self.requests = Counter(
            "proxy_requests", "Proxy requests finished, by outcome.",
            ["service", "family", "status", "user_type"], registry=target,
        )  # fmt: skip
        self.tokens = Counter(
            "proxy_tokens", "Tokens of served requests.", ["service", "family", "direction"], registry=target
        )
        self.latency = Histogram(
            "proxy_request_seconds", "Whole request time, as the client saw it (to the last byte).",
            ["service", "streamed"], buckets=LATENCY_BUCKETS, registry=target,
        )  # fmt: skip
        self.upstream = Histogram(
            "proxy_upstream_seconds", "Upstream time to its response headers (the successful try).",
            ["service"], buckets=LATENCY_BUCKETS, registry=target,
        )  # fmt: skip
        self.added = Histogram(
            "proxy_added_seconds", "Time the proxy added before the reply began: all but waiting for upstreams.",
            ["service"], buckets=ADDED_BUCKETS, registry=target,
        )  # fmt: skip
        self.first_byte = Histogram(
            "proxy_time_to_first_byte_seconds", "Streams: from the request to the first event relayed.",
            ["service"], buckets=LATENCY_BUCKETS, registry=target,
        )  # fmt: skip
        self.streams = Gauge(
            "proxy_streams_in_flight", "Streams being relayed now.", ["service"],
            registry=target, multiprocess_mode="livesum",
        )  # fmt: skip
        self.queue_wait = Histogram(
            "proxy_queue_wait_seconds", "Time requests waited in the queue.", ["service"],
            buckets=LATENCY_BUCKETS, registry=target,
        )  # fmt: skip
        self.refused_connections = Counter(
            "proxy_refused_connections", "Connections the guard refused before a request was read, by reason.",
            ["reason"], registry=target,
        )  # fmt: skip
        self._children: dict[tuple, Any] = {}
        self._scrape = CollectorRegistry() if multiprocess else self.registry
        if multiprocess:
            MultiProcessCollector(self._scrape)
        if key_states is not None:
            self._scrape.register(_KeyStateCollector(key_states))
        if queue is not None:
            self._scrape.register(_QueueCollector(queue))

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(
        self,
        *,
        service: str,
        family: str,
        status: int,
        user_type: str,
        streamed: bool,
        tokens_in: int,
        tokens_out: int,
        total_s: float,
        upstream_s: float | None,
        added_s: float | None,
        first_byte_s: float | None,
        queued_s: float | None = None,
    ) -> None:
        family = family or "-"
        if queued_s is not None:
            self._child(self.queue_wait, service).observe(queued_s)
        self._child(self.requests, service, family, str(status), user_type).inc()
        if tokens_in:
            self._child(self.tokens, service, family, "in").inc(tokens_in)
        if tokens_out:
            self._child(self.tokens, service, family, "out").inc(tokens_out)
        self._child(self.latency, service, "true" if streamed else "false").observe(total_s)
        if upstream_s is not None:
            self._child(self.upstream, service).observe(upstream_s)
        if added_s is not None:
            self._child(self.added, service).observe(max(added_s, 0.0))
        if first_byte_s is not None:
            self._child(self.first_byte, service).observe(first_byte_s)

    def connection_refused(self, reason: str) -> None:
        self._child(self.refused_connections, reason).inc()

    def stream_started(self, service: str) -> None:
        self._child(self.streams, service).inc()

    def stream_ended(self, service: str) -> None:
        self._child(self.streams, service).dec()

    def exposition(self) -> bytes:
        return generate_latest(self._scrape)

    def route(self, metrics_key: str) -> Callable[[Request], Any]:
        """The /metrics handler: open, or only for `Authorization: Bearer <metrics_key>` when set."""
        expected = f"Bearer {metrics_key}".encode() if metrics_key else None

        async def metrics(request: Request) -> Response:
            if expected is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return Response(
                        "This needs 'Authorization: Bearer <METRICS_KEY>'.\n", 401,
                        headers={"WWW-Authenticate": "Bearer"}, media_type="text/plain",
                    )  # fmt: skip
            return Response(self.exposition(), 200, media_type=CONTENT_TYPE_LATEST)

        return metrics


class _KeyStateCollector:
    """Key counts per service and state, read from the pools when scraped."""

    def __init__(self, key_states: KeyStates) -> None:
        self._key_states = key_states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("proxy_keys", "Upstream keys by state.", labels=["service", "state"])
        for service, counts in self._key_states().items():
            for state in KEY_STATES:
                family.add_metric([service, state], counts.get(state, 0))
        yield family


class _QueueCollector:
    """Requests waiting for a key and the expected wait, per service and family, when scraped
    (this process's line: each instance has its own)."""

    def __init__(self, queue: QueueView) -> None:
        self._queue = queue

    def collect(self) -> Iterable[GaugeMetricFamily]:
        waiting = GaugeMetricFamily("proxy_queue_length", "Requests waiting for a key.", labels=["service", "family"])
        wait = GaugeMetricFamily(
            "proxy_queue_expected_wait_seconds", "Expected wait of a new request.", labels=["service", "family"]
        )
        for service, lines in self._queue().items():
            for family, line in lines.items():
                waiting.add_metric([service, family], line.get("waiting", 0))
                wait.add_metric([service, family], line.get("estimated_wait_s", 0.0))
        yield waiting
        yield wait
