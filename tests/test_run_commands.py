"""cancel, resume, budget caps, the response cache and idempotency keys, on real Redis and RQ workers."""
from __future__ import annotations

import pytest

from pipeline import runs
from pipeline.budget import spend_key
from pipeline.pricing import PriceTable

from . import processes
from .datasets import tricky_rows, write

TEMPLATE = "Q: {{ text }}"


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def test_cancel_drops_queued_chunks_and_resume_finishes_the_run(pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(100))
    report = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10)
    assert runs.cancel(pipeline.redis, pipeline.settings, report.run_id) == 10
    pipeline.work()
    pipeline.collect()
    assert pipeline.results(report.run_id) == []
    assert pipeline.run_row(report.run_id)["status"] == "cancelled"

    assert runs.resume(pipeline.redis, pipeline.settings, report.run_id) == 10
    pipeline.work()
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"]) == ("completed", 100)
    assert len(pipeline.results(report.run_id)) == 100


def test_cancel_mid_run_keeps_paid_answers_and_resume_answers_only_the_rest(make_pipeline, tmp_path):
    pipeline = make_pipeline(fake_latency=0.05, worker_concurrency=2)
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(80)), TEMPLATE, id_column="id", chunk_size=40)
    worker = processes.start(["worker.py", "--burst"], pipeline.env())
    try:
        processes.wait_for(lambda: pipeline.redis.hlen(f"run:{report.run_id}:done") >= 10, 30, "first answers")
        runs.cancel(pipeline.redis, pipeline.settings, report.run_id)
        assert worker.wait(timeout=60) == 0
    finally:
        processes.kill_tree(worker)
    pipeline.collect()
    kept = {r["row_key"]: r["finished_at"] for r in pipeline.results(report.run_id)}
    assert 10 <= len(kept) < 80
    assert pipeline.run_row(report.run_id)["status"] == "cancelled"

    runs.resume(pipeline.redis, pipeline.settings, report.run_id)
    pipeline.work()
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert len(results) == 80 and pipeline.run_row(report.run_id)["status"] == "completed"
    assert all(results[k]["finished_at"] == t for k, t in kept.items())   # not answered a second time


def test_resume_refuses_while_chunks_are_still_queued(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(5)), TEMPLATE)
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="still has 1 chunk job"):
        runs.resume(pipeline.redis, pipeline.settings, report.run_id)


def test_budget_cap_stops_the_run_before_overspending_with_concurrent_workers(make_pipeline, tmp_path):
    pipeline = make_pipeline(fake_latency=0.01, worker_concurrency=16)
    cap = 0.002
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(400)), TEMPLATE, id_column="id",
                             chunk_size=50, max_cost=cap, use_cache=False)
    worker = processes.start(["worker.py", "--burst", "--processes", "2"], pipeline.env())
    assert worker.wait(timeout=120) == 0
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert run["status"] == "budget_exhausted"
    assert 0 < run["rows_succeeded"] < 400
    assert run["cost"] <= cap
    spent_in_redis = int(pipeline.redis.get(spend_key(report.run_id))) / 1e9
    assert spent_in_redis <= cap
    assert run["cost"] == pytest.approx(spent_in_redis, abs=1e-9)
    # The run stops only when the next call's worst case (256 output tokens + its prompt) no longer fits:
    worst_case = PriceTable.load().cost("fake", 20, 256)
    assert run["cost"] > cap - worst_case

    kept = {r["row_key"]: r["finished_at"] for r in pipeline.results(report.run_id)}
    runs.resume(pipeline.redis, pipeline.settings, report.run_id, max_cost=1.0)
    pipeline.work()
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"]) == ("completed", 400)
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert all(results[k]["finished_at"] == t for k, t in kept.items())


def test_resubmitting_hits_the_cache_and_any_change_misses_it(pipeline, tmp_path):
    rows = [{"id": str(i), "text": f"unique row {i}"} for i in range(30)]
    dataset = write(tmp_path / "d.csv", rows)

    def run(**fields):
        report = pipeline.submit(dataset, fields.pop("template", TEMPLATE), id_column="id", **fields)
        pipeline.work()
        pipeline.collect()
        return pipeline.run_row(report.run_id)

    first = run(idempotency_key="day-1")
    assert (first["rows_cached"], first["attempts"]) == (0, 30)
    again = run(idempotency_key="day-2")                       # a new run of the same thing: all from cache
    assert (again["rows_succeeded"], again["rows_cached"], again["attempts"], again["cost"]) == (30, 30, 0, 0)
    assert run(idempotency_key="day-3", use_cache=False)["attempts"] == 30
    assert run(idempotency_key="day-4", template="Other: {{ text }}")["rows_cached"] == 0
    assert run(idempotency_key="day-5", temperature=0.5)["rows_cached"] == 0
    assert run(idempotency_key="day-6", max_tokens=100)["rows_cached"] == 0
    assert run(idempotency_key="day-7", system_prompt="Be brief.")["rows_cached"] == 0


def test_idempotency_key_returns_the_existing_run(pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(20))
    first = pipeline.submit(dataset, TEMPLATE, idempotency_key="2026-11-24")
    second = pipeline.submit(dataset, "Changed: {{ text }}", idempotency_key="2026-11-24")
    assert second.existing and second.run_id == first.run_id and second.jobs_enqueued == 0
    third = pipeline.submit(dataset, TEMPLATE, idempotency_key="2026-11-25")
    assert third.run_id != first.run_id
