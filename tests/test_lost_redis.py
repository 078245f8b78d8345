"""A lost Redis, followed up: submitting the same dataset again, or waiting on the run, after Redis lost its
state. SQL is the record of what is done: no row with a succeeded result there is asked again, and ``wait``
says at once that nothing is working on the run. On SQLite and PostgreSQL, with real processes."""

from __future__ import annotations

import json

from pipeline.collect import store
from pipeline.control import runs

from . import processes
from .datasets import tricky_rows, write
from .fakeprovider import FakeProvider
from .processes import cli

TEMPLATE = "Q: {{ text }}"


def _in_sql(pipeline, run_id: str) -> set[str]:
    with pipeline.engine.connect() as conn:
        return store.result_keys(conn, run_id, "succeeded")


def test_redis_flushed_mid_run_wait_says_so_and_the_same_submit_pays_no_row_in_sql_twice(make_pipeline, tmp_path):
    rows = tricky_rows(40)
    with FakeProvider(latency=0.05) as server:
        pipeline = make_pipeline(worker_concurrency=2, openai_api_key="sk-test", openai_base_url=f"{server.url}/v1")
        request = runs.RunRequest(
            dataset=write(tmp_path / "d.csv", rows),
            template=TEMPLATE,
            id_column="id",
            chunk_size=10,
            provider="openai",
            model="gpt-4o-mini",
            use_cache=False,
            idempotency_key="nightly-2026-12-06",
        )
        report = runs.submit(pipeline.redis, pipeline.settings, request, engine=pipeline.engine)
        worker = processes.start(["worker.py", "--burst"], pipeline.env())
        collector = processes.start(["enqueue.py", "collect"], pipeline.env())
        try:
            processes.wait_for(lambda: len(_in_sql(pipeline, report.run_id)) >= 10, 60, "results in SQL")
            pipeline.redis.flushdb()  # Redis lost its data mid-run
            assert worker.wait(timeout=60) == 0
        finally:
            processes.kill_tree(worker)
            processes.kill_tree(collector)
        pipeline.collect()

        waited = cli(pipeline, "wait", report.run_id, "--timeout", "3600")  # returns at once, not in an hour
        assert waited.returncode == 4, waited.stderr
        assert "queue state in Redis is gone" in waited.stderr and f"resume {report.run_id}" in waited.stderr

        answered = _in_sql(pipeline, report.run_id)
        again = runs.submit(pipeline.redis, pipeline.settings, request, engine=pipeline.engine)  # the cron again
        assert (again.run_id, again.existing) == (report.run_id, True)
        pipeline.work()
        pipeline.collect()
        paid = server.stats()["paid"]
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"]) == ("completed", 40)
    prompt = {r["id"]: f"Q: {r['text']}" for r in rows}
    assert 10 <= len(answered) < 40
    assert [key for key in answered if paid[prompt[key]] != 1] == []  # rows in SQL were not asked again
    print(
        f"submit again after a flush with {len(answered)} of 40 rows in SQL: {sum(paid.values())} calls in all, "
        f"{sum(paid[prompt[k]] for k in answered)} for those rows (before: each of them asked again)"
    )


def test_a_run_complete_in_sql_is_not_paid_again_when_submitted_after_redis_lost_it(make_pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(12))
    with FakeProvider() as server:
        pipeline = make_pipeline(openai_api_key="sk-test", openai_base_url=f"{server.url}/v1")
        run_id = pipeline.submit(
            dataset, TEMPLATE, id_column="id", chunk_size=4, provider="openai", model="gpt-4o-mini", use_cache=False
        ).run_id
        pipeline.work()
        pipeline.collect()
        cost = pipeline.run_row(run_id)["cost_nano"]
        pipeline.redis.flushdb()

        again = cli(
            pipeline,
            "submit",
            str(dataset),
            "-t",
            TEMPLATE,
            "--id-column",
            "id",
            "--chunk-size",
            "4",
            "-p",
            "openai",
            "-m",
            "gpt-4o-mini",
            "--no-cache",
            "--json",
        )  # the same file, again
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) | {"unpriced": []} == {
            "run_id": run_id,
            "rows": 12,
            "chunks": 3,
            "jobs_enqueued": 0,
            "existing": True,
            "unpriced": [],
        }
        pipeline.work()
        pipeline.collect()
        assert server.stats()["requests"] == 12  # before: 24, every row paid twice
    run = pipeline.run_row(run_id)
    assert (run["status"], run["rows_succeeded"], run["cost_nano"]) == ("completed", 12, cost)
