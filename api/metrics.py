"""Prometheus metrics of one app instance (its own registry, so that several apps share a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mammofl_http_requests", "HTTP requests by route and status",
                                ("method", "route", "status"), registry=self.registry)
        self.request_seconds = Histogram("mammofl_http_request_seconds", "HTTP request duration by route",
                                         ("method", "route"), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.predictions = Counter("mammofl_predictions", "predictions made, by serving variant", ("variant",),
                                   registry=self.registry)
        self.inference_seconds = Histogram("mammofl_inference_seconds", "preprocessing and model time by variant",
                                           ("variant",), buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)

    def observe_prediction(self, variant: str, seconds: float) -> None:
        self.predictions.labels(variant).inc()
        self.inference_seconds.labels(variant).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
