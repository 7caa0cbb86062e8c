"""Prometheus metrics from the event stream (the ``[prometheus]`` extra; docs/observability.md).

Each process counts its own (gunicorn: prometheus_client's multi-process mode); every metric is
labelled by the masked app key (:func:`~kis_safe_token.events.app_key_label`) and the backend.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Final

from .events import Event, Kind, subscribe

__all__ = ["METRICS_ENV", "enable_prometheus", "from_environment"]

METRICS_ENV: Final = "KOREA_INVESTMENT_METRICS"
_guard = threading.Lock()
_enabled: dict[int, Any] = {}

#: Buckets (s) for waits and KIS latency: a warm wait is milliseconds, an EGW00133 sit-out a minute.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def from_environment() -> None:
    """Turn the metrics on if ``$KOREA_INVESTMENT_METRICS`` says ``prometheus`` (every client
    construction asks); ``ValueError`` naming the variable for any other value but ``off``."""
    value = os.environ.get(METRICS_ENV, "").strip().lower()
    if value == "prometheus":
        enable_prometheus()  # a no-op once the default registry is fed
    elif value not in ("", "off"):
        raise ValueError(f"{METRICS_ENV} must be one of prometheus, off (or unset)")


def enable_prometheus(registry: Any = None) -> None:
    """Feed metrics in ``registry`` (``None``: prometheus_client's default) from this process's
    events; again for the same registry: a no-op."""
    try:
        import prometheus_client as prom
    except ImportError as exc:
        raise ImportError(
            "metrics need prometheus_client: pip install 'kis-safe-token[prometheus]'"
        ) from exc
    registry = prom.REGISTRY if registry is None else registry
    with _guard:
        if id(registry) in _enabled:
            return
        metrics = _enabled[id(registry)] = _Metrics(prom, registry)
        subscribe(metrics.record)


class _Metrics:
    def __init__(self, prom: Any, registry: Any) -> None:
        labels = ("app_key", "backend")

        def counter(name: str, doc: str, *extra: str) -> Any:
            return prom.Counter(name, doc, (*labels, *extra), registry=registry)

        def histogram(name: str, doc: str) -> Any:
            return prom.Histogram(name, doc, labels, buckets=BUCKETS, registry=registry)

        self.events = counter("kis_token_events", "Events of the token path, by kind.", "event")
        self.issued = counter("kis_token_issuances", "Tokens KIS issued to this fleet.", "what")
        self.kis_errors = counter("kis_token_kis_errors", "KIS error codes answered.", "code")
        self.calls = counter("kis_token_kis_calls", "REST calls sent to KIS through a client.")
        self.store_errors = counter("kis_token_store_errors", "Store reads or writes that failed.")
        self.token_wait = histogram("kis_token_wait_seconds", "Time waited for another holder.")
        self.rate_wait = histogram("kis_token_rate_wait_seconds", "Time waited for a rate slot.")
        self.issue_latency = histogram("kis_token_issue_seconds", "KIS latency of an issuance.")
        self.expiry = prom.Gauge(
            "kis_token_expiry_timestamp_seconds",
            "When the current token expires (epoch s); seconds left: this minus time().",
            labels,
            multiprocess_mode="max",
            registry=registry,
        )

    def record(self, event: Event) -> None:
        key, backend, kind = event.app_key, event.backend, event.kind
        self.events.labels(key, backend, kind.value).inc()
        if kind is Kind.KIS_CALL:
            self.calls.labels(key, backend).inc()
        elif kind is Kind.KIS_ERROR:
            self.kis_errors.labels(key, backend, event.code).inc()
        elif kind is Kind.STORE_ERROR:
            self.store_errors.labels(key, backend).inc()
        elif kind is Kind.RATE_WAITED:
            self.rate_wait.labels(key, backend).observe(event.seconds)
        elif kind is Kind.ISSUED:
            self.issued.labels(key, backend, event.what).inc()
            self.issue_latency.labels(key, backend).observe(event.seconds)
        if event.waited_s:
            self.token_wait.labels(key, backend).observe(event.waited_s)
        if event.expires_at is not None and event.what == "token":
            self.expiry.labels(key, backend).set(event.expires_at)
