"""What every request did: a JSON access log line and Prometheus request metrics, by route and status.

The web process has its own registry and serves it on its own /metrics. Gunicorn runs one worker process
(with threads; see web/gunicorn_conf.py), so that registry counts every request of the process and no
multiprocess files are needed; more capacity means more web processes, each scraped.
"""

from __future__ import annotations

import hmac
import logging
import time

from apiflask import APIFlask
from flask import Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from pipeline.settings import Settings

access_log = logging.getLogger("web.access")
LOOPBACK = {"127.0.0.1", "::1"}


class RequestMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "web_http_requests_total",
            "HTTP requests answered by the web API and pages",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "web_http_request_duration_seconds",
            "Time to answer a request (streamed downloads: until the body starts)",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )


def route_label() -> str:
    """The matched rule (``/api/v1/runs/<run_id>``), never the raw path, so labels stay few."""
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


def install(app: APIFlask, settings: Settings) -> RequestMetrics:
    metrics = RequestMetrics()

    @app.before_request
    def start_clock() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        route, status = route_label(), str(response.status_code)
        metrics.requests.labels(request.method, route, status).inc()
        metrics.latency.labels(request.method, route, status).observe(seconds)
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            status,
            extra={
                "http_method": request.method,
                "path": request.path,
                "route": route,
                "status": response.status_code,
                "duration_ms": round(seconds * 1000, 2),
                "remote_addr": request.remote_addr,
                "user": g.get("user_name"),
                "bytes": response.content_length,
            },
        )
        return response

    @app.get("/metrics")
    @app.doc(hide=True)
    def serve_metrics() -> Response:
        if not _may_scrape(settings):
            return Response("not found\n", status=404, mimetype="text/plain")
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    return metrics


def _may_scrape(settings: Settings) -> bool:
    """With WEB_METRICS_TOKEN set, a scraper sends it as a bearer token; without it, only this machine reads."""
    if settings.web_metrics_token is None:
        return request.remote_addr in LOOPBACK
    expected = f"Bearer {settings.web_metrics_token.get_secret_value()}"
    return hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected.encode())
