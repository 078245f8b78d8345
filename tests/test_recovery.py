"""A lost Redis is an outage, not a loss: SQL is the record of what is done, and resume rebuilds from it."""

from __future__ import annotations

from pipeline.collect import store
from pipeline.control import runs

from . import processes
from .datasets import tricky_rows, write
from .fakeprovider import FakeProvider

TEMPLATE = "Q: {{ text }}"


def _in_sql(pipeline, run_id: str) -> set[str]:
    with pipeline.engine.connect() as conn:
        return store.result_keys(conn, run_id, "succeeded")


def test_redis_flushed_mid_run_resume_rebuilds_from_sql_and_pays_no_row_twice(make_pipeline, tmp_path, capsys):
    from enqueue import print_status

    rows = tricky_rows(60)
    with FakeProvider(latency=0.05) as server:
        pipeline = make_pipeline(worker_concurrency=2, openai_api_key="sk-test", openai_base_url=f"{server.url}/v1")
        report = pipeline.submit(
            write(tmp_path / "d.csv", rows),
            TEMPLATE,
            id_column="id",
            chunk_size=10,
            provider="openai",
            model="gpt-4o-mini",
            use_cache=False,
        )
        worker = processes.start(["worker.py", "--burst"], pipeline.env())
        collector = processes.start(["enqueue.py", "collect"], pipeline.env())
        try:
            processes.wait_for(lambda: len(_in_sql(pipeline, report.run_id)) >= 15, 60, "results in SQL")
            pipeline.redis.flushdb()  # Redis lost its data mid-run
            assert worker.wait(timeout=60) == 0  # its running chunks end, nothing is left
        finally:
            processes.kill_tree(worker)
            processes.kill_tree(collector)
        pipeline.collect()
        info = runs.run_status(pipeline.redis, pipeline.engine, report.run_id)
        assert info["status"] == "running" and f"resume {report.run_id}" in info["note"]
        print_status(info, as_json=False)
        assert "queue state in Redis is gone" in capsys.readouterr().out

        answered = _in_sql(pipeline, report.run_id)
        runs.resume(pipeline.redis, pipeline.settings, report.run_id, engine=pipeline.engine)
        pipeline.work()
        pipeline.collect()
        paid = server.stats()["paid"]
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"]) == ("completed", 60)
    prompt = {r["id"]: f"Q: {r['text']}" for r in rows}
    assert 15 <= len(answered) < 60
    assert [key for key in answered if paid[prompt[key]] != 1] == []  # rows in SQL were not asked again
    assert all(paid[prompt[r["id"]]] >= 1 for r in rows)
    print(
        f"flushed with {len(answered)} of 60 rows in SQL: {sum(paid.values())} calls in all, "
        f"{sum(paid[prompt[k]] for k in answered)} for those rows"
    )
