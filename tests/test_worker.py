"""The worker runs only the pipeline's own jobs, and obeys SIGTERM: real RQ workers, real processes, real Redis."""

from __future__ import annotations

import signal

import pytest
from rq import Callback, Queue, Worker
from rq.job import Job, JobStatus

from pipeline import handoff
from pipeline.queue import SERIALIZER

from . import processes
from .datasets import tricky_rows, write


@pytest.fixture
def database_url(tmp_path):
    """Job handling lives in Redis and the workers; one database is enough here."""
    return f"sqlite:///{tmp_path / 'results.db'}"


def test_a_foreign_job_in_the_queue_runs_nothing(pipeline, tmp_path):
    """Whoever can write to Redis can enqueue a job naming any function: the worker refuses it, and its
    callbacks, and fails it with a clear reason."""
    marker = tmp_path / "pwned"
    queue = Queue(pipeline.settings.queue_name, connection=pipeline.redis, serializer=SERIALIZER)
    foreign = queue.enqueue("os.system", f"touch {marker}", on_failure=Callback("os.system"))
    pipeline.work()
    assert not marker.exists()
    job = Job.fetch(foreign.id, connection=pipeline.redis, serializer=SERIALIZER)
    assert job.get_status() == JobStatus.FAILED
    assert "os.system is not one of the pipeline's job functions" in (job.latest_result().exc_string or "")


def _done(pipeline, run_id: str) -> int:
    return int(pipeline.redis.hlen(handoff.done_key(run_id)))


def test_sigterm_ends_the_pool_every_time_and_hands_running_chunks_back(make_pipeline, tmp_path):
    """Ten SIGTERMs in a row, each to a pool busy with chunks: each stop is clean (exit 0, no worker left
    registered), unstarted rows go back with their chunk, and in the end every row has exactly one result."""
    pipeline = make_pipeline(fake_latency=0.3, worker_concurrency=8)
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(600)), "Q: {{ text }}", id_column="id", chunk_size=20
    )
    for _ in range(10):
        before = _done(pipeline, report.run_id)
        pool = processes.start(["worker.py", "--processes", "2"], pipeline.env())
        try:
            processes.wait_for(
                lambda before=before: _done(pipeline, report.run_id) > before + 4, 60, "answers from the pool"
            )
            pool.send_signal(signal.SIGTERM)
            assert pool.wait(timeout=60) == 0
        finally:
            processes.kill_tree(pool)
        assert Worker.all(connection=pipeline.redis) == []
    pipeline.work()
    pipeline.collect()
    results = pipeline.results(report.run_id)
    assert len(results) == 600 and all(r["status"] == "succeeded" for r in results)
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 600
