"""The app's own Prometheus metrics and the middleware that counts every HTTP response.

``MetricsMiddleware`` sits outside the exception handlers and the request-id middleware, so a
refusal (401, 403, 404, 405, 400, 413, 503) and a 500 are counted like a served request. Its
``route`` label is the matched route's name, or ``UNMATCHED`` for a path no route has: never the
raw path, so no client can grow the label set.

Usage per API key is labelled with the key's name (``static`` for a key of the static list,
``anonymous`` without one), never its secret: names are the operator's, so the label set grows
only with keys the operator creates. These counters are this replica's; the cluster's totals per
day are in the key store (``python -m serve_app usage --by-key``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNMATCHED = "unmatched"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serve_app_requests", "HTTP responses by route and status, refusals included.",
            ["route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "serve_app_request_seconds", "Time to response headers, by route.", ["route"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "serve_app_requests_in_flight", "Generation requests being served.",
            registry=self.registry,
        )
        self.key_requests = Counter(
            "serve_app_key_requests", "Generation requests served, by API key name and model.",
            ["key", "model"], registry=self.registry,
        )
        self.key_prompt_tokens = Counter(
            "serve_app_key_prompt_tokens", "Prompt tokens (as vLLM counts them), by API key name "
            "and model.", ["key", "model"], registry=self.registry,
        )
        self.key_completion_tokens = Counter(
            "serve_app_key_completion_tokens", "Completion tokens (as vLLM counts them), by API "
            "key name and model.", ["key", "model"], registry=self.registry,
        )
        self.rate_limited = Counter(
            "serve_app_key_rate_limited", "Requests refused with 429, by API key name and the "
            "kind of limit (requests, tokens).", ["key", "limit"], registry=self.registry,
        )

    def count_key(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.key_requests.labels(key, model).inc()
        self.key_prompt_tokens.labels(key, model).inc(prompt_tokens)
        self.key_completion_tokens.labels(key, model).inc(completion_tokens)


class MetricsMiddleware:
    """Counts each response by route and status when its headers leave, and times it from
    the request's arrival to then. Memory only: a dict lookup and two metric updates."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[BaseRoute],
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.app = app
        self._metrics = metrics
        self._now = now
        # The router leaves the matched route's endpoint in the scope (for a 405 too); the
        # route's name is the label.
        self._names = {r.endpoint: r.name for r in routes if isinstance(r, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = self._now()

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = self._names.get(scope.get("endpoint"), UNMATCHED)
                self._metrics.requests.labels(route, str(message["status"])).inc()
                self._metrics.latency.labels(route).observe(self._now() - started)
            await send(message)

        await self.app(scope, receive, counted)
