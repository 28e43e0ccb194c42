"""The service's Prometheus metrics (prometheus-client; names prefixed `vlp_`, base units), in a registry of
its own so that several apps in one process do not share counts."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("vlp_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("vlp_request_duration_seconds", "time from a request's arrival to its response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("vlp_queue_wait_seconds", "time a model call waited in its model's queue",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_items = Histogram("vlp_batch_items", "items in one call of a model", ["model"],
                                     buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("vlp_queue_depth", "calls waiting or running per model", ["model"],
                                 registry=self.registry)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch_observer(self, model: str) -> Callable[[float, int], None]:
        def observe(wait_s: float, items: int) -> None:
            self.queue_wait.labels(model).observe(wait_s)
            self.batch_items.labels(model).observe(items)

        return observe

    def depth_setter(self, model: str) -> Callable[[int], None]:
        return self.queue_depth.labels(model).set
