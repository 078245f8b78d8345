"""Redis memory is bounded: a final run's keys expire, idle consumers leave the group, the parked stream is capped."""

from __future__ import annotations

from pipeline.collect.collector import Collector
from pipeline.control import runs
from pipeline.handoff import GROUP, Entry, StreamReader

from . import processes
from .datasets import tricky_rows, write

TEMPLATE = "Q: {{ text }}"


def _run_footprint(pipeline, run_id: str, key: str) -> tuple[int, int]:
    """Keys that belong to the run (its idempotency key included) and the bytes Redis says they use."""
    keys = list(pipeline.redis.scan_iter(f"run:{run_id}:*")) + list(pipeline.redis.scan_iter(f"runs:idempotency:{key}"))
    return len(keys), sum(pipeline.redis.memory_usage(k) or 0 for k in keys)


def test_a_final_runs_keys_expire_after_the_retention(make_pipeline, tmp_path):
    pipeline = make_pipeline(run_retention_seconds=1)
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(40)),
        TEMPLATE,
        id_column="id",
        chunk_size=10,
        max_cost=1.0,
        idempotency_key="night-1",
    )
    pipeline.work()
    during = _run_footprint(pipeline, report.run_id, "night-1")
    pipeline.collect()
    assert pipeline.run_row(report.run_id)["status"] == "completed"
    assert during[0] >= 6, during  # config, enqueued, submitted, done, spend, idempotency
    processes.wait_for(lambda: _run_footprint(pipeline, report.run_id, "night-1") == (0, 0), 10, "the run's keys")
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 40  # SQL keeps the record
    assert runs.resume(pipeline.redis, pipeline.settings, report.run_id, engine=pipeline.engine) == 0  # from SQL
    print(f"run keys: {during[0]} keys / {during[1]} bytes at the end of the run, 0 after the retention")


def test_a_run_that_runs_again_keeps_its_keys(make_pipeline, tmp_path):
    """cancel makes a run final (its keys get an expiry); resume makes it run again (they lose it)."""
    pipeline = make_pipeline()
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(10)), TEMPLATE, id_column="id")
    runs.cancel(pipeline.redis, pipeline.settings, report.run_id)
    pipeline.collect()
    config = runs.config_key(report.run_id)
    assert 0 < pipeline.redis.ttl(config) <= pipeline.settings.run_retention_seconds
    runs.resume(pipeline.redis, pipeline.settings, report.run_id)
    pipeline.collect()
    assert pipeline.redis.ttl(config) == -1


def test_idle_consumers_leave_the_group_and_parked_entries_are_capped(make_pipeline):
    pipeline = make_pipeline(consumer_idle_seconds=0.05, parked_max_entries=10)
    stream = pipeline.settings.result_stream
    StreamReader(pipeline.redis, stream)  # the group
    pipeline.redis.xgroup_createconsumer(stream, GROUP, "old-run-4242")  # a `run` command's, long gone

    def names() -> set[str]:
        return {c["name"].decode() for c in pipeline.redis.xinfo_consumers(stream, GROUP)}

    processes.wait_for(lambda: pipeline.redis.xinfo_consumers(stream, GROUP)[0]["idle"] >= 50, 5, "idle time")
    collector = Collector(pipeline.settings, pipeline.redis, pipeline.engine, consumer="run-123")
    collector.run(burst=True)
    assert names() == set()  # the stale one swept, the burst collector's own one gone
    reader = collector.reader
    for n in range(300):
        reader.park(Entry(f"{n}-1".encode(), "result", {"n": n}), "test")
    assert pipeline.redis.xlen(reader.parked_stream) <= 10 + 100  # MAXLEN ~: trimmed by whole stream nodes
