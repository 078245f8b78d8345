"""Which outcome of a row wins is decided by a number every host shares (the run's retry generation, counted in
Redis), never by the clocks of different machines. On SQLite and PostgreSQL, with real workers and collector."""

from __future__ import annotations

from pipeline.control import runs

from .datasets import write
from .fakeprovider import FakeProvider

TEMPLATE = "Q: {{ text }}"


def test_a_worker_whose_clock_is_behind_and_a_redelivery_leave_no_row_retrying(make_pipeline, tmp_path):
    """retry-failed is run on one host; the row's new (failed again) result comes from a worker whose clock is
    3 s behind, and the retry's event is delivered to the collector again after that result was written. The
    row must end failed and the run completed with it counted (before: the row stayed ``retrying``)."""
    data = [{"id": "good", "text": "fine"}, {"id": "bad", "text": "refused"}]
    with FakeProvider(rules=[{"match": "refused", "action": 400, "times": None}]) as server:
        settings = {"openai_api_key": "sk-test", "openai_base_url": f"{server.url}/v1"}
        pipeline = make_pipeline(**settings)
        behind = make_pipeline(clock_offset=-3.0, **settings)  # the same Redis and database
        report = pipeline.submit(
            write(tmp_path / "d.csv", data),
            TEMPLATE,
            id_column="id",
            provider="openai",
            model="gpt-4o-mini",
            use_cache=False,
        )
        pipeline.work()
        pipeline.collect()
        assert pipeline.run_row(report.run_id)["status"] == "completed"

        stream = pipeline.settings.result_stream
        before = pipeline.redis.xrange(stream)
        assert runs.retry_failed(pipeline.redis, pipeline.settings, pipeline.engine, report.run_id) == 1
        retry_events = pipeline.redis.xrange(stream)[len(before) :]
        behind.work()
        pipeline.collect()
        for _, fields in retry_events:  # the retry's event, delivered again
            pipeline.redis.xadd(stream, fields)
        pipeline.collect()
        assert server.stats()["by_status"] == {"200": 1, "400": 2}

    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert (results["bad"]["status"], results["bad"]["generation"], results["bad"]["attempts"]) == ("failed", 1, 2)
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"], run["rows_failed"]) == ("completed", 1, 1)
