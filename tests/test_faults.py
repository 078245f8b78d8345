"""Nothing lost, nothing paid twice: real processes killed and restarted in the middle of a run."""
from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline import handoff
from pipeline.collector import Collector
from pipeline.handoff import StreamReader
from pipeline.records import Result

from . import processes
from .datasets import tricky_rows, write


@pytest.fixture
def database_url(tmp_path):
    """Fault handling is in Redis and the workers; one database is enough here."""
    return f"sqlite:///{tmp_path / 'results.db'}"


def _done(pipeline, run_id: str) -> int:
    return int(pipeline.redis.hlen(handoff.done_key(run_id)))


def _answered_before(pipeline, run_id: str) -> dict[str, float]:
    """Row keys handed over so far (their result is in the stream), with the time we looked."""
    return dict.fromkeys((k.decode() for k in pipeline.redis.hkeys(handoff.done_key(run_id))), time.time())


def test_killed_work_horse_chunk_is_retried_without_redoing_answered_rows(make_pipeline, tmp_path):
    pipeline = make_pipeline(fake_latency=0.05, worker_concurrency=2)
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(60)), "Q: {{ text }}", id_column="id",
                             chunk_size=60)
    worker = processes.start(["worker.py", "--burst"], pipeline.env())
    try:
        processes.wait_for(lambda: _done(pipeline, report.run_id) >= 10, 30, "first answers")
        horse = processes.horse_of(worker.pid)
        assert horse is not None
        before = _answered_before(pipeline, report.run_id)
        os.kill(horse, signal.SIGKILL)          # what the OOM killer does
        assert worker.wait(timeout=60) == 0     # RQ retries the chunk; the burst worker drains it
    finally:
        processes.kill_tree(worker)
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert len(results) == 60 and all(r["status"] == "succeeded" for r in results.values())
    for key, seen_at in before.items():          # answered before the kill: not requested again
        assert results[key]["finished_at"] <= seen_at
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 60


def test_killed_worker_machine_chunk_comes_back_through_abandoned_job_detection(make_pipeline, tmp_path):
    """The whole worker dies; another worker's maintenance finds the abandoned chunk (about 60 s + intervals)."""
    pipeline = make_pipeline(fake_latency=0.05, worker_concurrency=2, job_monitoring_interval=1,
                             worker_maintenance_interval=2)
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(40)), "Q: {{ text }}", id_column="id",
                             chunk_size=40)
    first = processes.start(["worker.py"], pipeline.env())
    try:
        processes.wait_for(lambda: _done(pipeline, report.run_id) >= 8, 30, "first answers")
        before = _answered_before(pipeline, report.run_id)
        processes.kill_tree(first)
    finally:
        processes.kill_tree(first)
    second = processes.start(["worker.py"], pipeline.env())
    try:
        processes.wait_for(lambda: _done(pipeline, report.run_id) >= 40, 150, "the abandoned chunk to finish",
                           interval=0.5)
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
        crashed._write(conn, entries)          # committed, but the process "dies" before acknowledging
    assert pipeline.redis.xlen(pipeline.settings.result_stream) == len(entries)
    restarted = Collector(pipeline.settings, pipeline.redis, pipeline.engine)
    restarted.reader.claim_idle_ms = 0
    pipeline_written = restarted.run(burst=True)
    assert pipeline_written == 0               # every redelivered result was already there
    run = pipeline.run_row(report.run_id)
    assert (run["rows_succeeded"], run["rows_failed"]) == (30, 0)
    assert len(pipeline.results(report.run_id)) == 30
    assert pipeline.redis.xlen(pipeline.settings.result_stream) == 0


def test_duplicate_deliveries_and_a_late_failure_never_undo_a_success(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(3)), "Q: {{ text }}", id_column="id")
    pipeline.work()
    pipeline.collect()
    first = pipeline.results(report.run_id)[0]
    late_failure = Result(run_id=report.run_id, row_key=first["row_key"], row_index=first["row_index"],
                          status="failed", input=first["input"], error="late duplicate",
                          finished_at=first["finished_at"] + 10)
    stream = pipeline.settings.result_stream
    for _ in range(2):
        pipeline.redis.xadd(stream, {"kind": handoff.RESULT, "data": late_failure.to_json()})
    pipeline.collect()
    assert pipeline.results(report.run_id)[0]["status"] == "succeeded"
    assert pipeline.run_row(report.run_id)["rows_failed"] == 0
    assert StreamReader(pipeline.redis, stream).backlog() == 0
