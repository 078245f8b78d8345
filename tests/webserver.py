"""The web app served over real HTTP (werkzeug on a loopback port, in a thread) on a test pipeline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from pipeline import users
from web.app import create_app

from .conftest import Pipeline

SECRET = "test-secret-key-of-at-least-32-characters!"
PASSWORD = "correct horse battery"
FAST = {
    "web_secret_key": SECRET,
    "web_cookie_secure": False,
    "web_submit_limit": "1000/minute",
    "web_login_limit": "1000/minute",
}


@dataclass
class Web:
    url: str
    pipeline: Pipeline
    app: Any
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_user(self, name: str, *, admin: bool = False) -> None:
        users.create_user(self.pipeline.engine, name, PASSWORD, admin=admin)

    def login(self, name: str, password: str = PASSWORD) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/api/v1/auth/login", json={"username": name, "password": password}, timeout=10
        )
        assert response.status_code == 200, response.text
        self.tokens[name] = response.json()
        return self.tokens[name]

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]['access_token']}"}

    def get(self, name: str | None, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.auth(name) if name else {}, timeout=30, **kwargs)

    def post(self, name: str | None, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, headers=self.auth(name) if name else {}, timeout=60, **kwargs)

    def finish(self, run_id: str, timeout: float = 60) -> dict[str, Any]:
        """Work and collect in burst mode (as `enqueue.py run` does) until the run is final."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pipeline.work()
            self.pipeline.collect()
            info = self.pipeline.run_row(run_id) if self._in_sql(run_id) else None
            if info and info["status"] in ("completed", "cancelled", "budget_exhausted"):
                return info
        raise AssertionError(f"run {run_id} did not finish")

    def _in_sql(self, run_id: str) -> bool:
        from pipeline.collect import store

        with self.pipeline.engine.connect() as conn:
            return store.get_run(conn, run_id) is not None


def serve(pipeline: Pipeline) -> Iterator[Web]:
    app = create_app(pipeline.settings, connection=pipeline.redis, engine=pipeline.engine)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-test-server", daemon=True)
    thread.start()
    try:
        yield Web(f"http://127.0.0.1:{server.server_port}", pipeline, app)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


# Named in the decorator: test modules import the functions, and a parameter named like an import would shadow it.
@pytest.fixture(name="make_web")
def make_web_fixture(make_pipeline):
    servers: list[Iterator[Web]] = []

    def factory(**overrides: Any) -> Web:
        pipeline = make_pipeline(**{**FAST, **overrides})
        server = serve(pipeline)
        servers.append(server)
        return next(server)

    yield factory
    for server in servers:
        server.close()


@pytest.fixture(name="web")
def web_fixture(make_web) -> Web:
    return make_web()
