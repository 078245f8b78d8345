"""cancel, resume, budget caps, the response cache and idempotency keys, on real Redis and RQ workers."""

from __future__ import annotations

import pytest

from pipeline.calls.budget import spend_key
from pipeline.control import runs
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
    assert all(results[k]["finished_at"] == t for k, t in kept.items())  # not answered a second time


def test_resume_refuses_while_chunks_are_still_queued(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(5)), TEMPLATE)
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="still has 1 chunk job"):
        runs.resume(pipeline.redis, pipeline.settings, report.run_id)


def test_budget_cap_stops_the_run_before_overspending_with_concurrent_workers(make_pipeline, tmp_path):
    pipeline = make_pipeline(fake_latency=0.01, worker_concurrency=16)
    cap = 0.002
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(400)),
        TEMPLATE,
        id_column="id",
        chunk_size=50,
        max_cost=cap,
        use_cache=False,
    )
    worker = processes.start(["worker.py", "--burst", "--processes", "2"], pipeline.env())
    assert worker.wait(timeout=120) == 0
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert run["status"] == "budget_exhausted"
    assert 0 < run["rows_succeeded"] < 400
    spent_in_redis = int(pipeline.redis.get(spend_key(report.run_id)))
    assert run["cost_nano"] == spent_in_redis <= cap * 1e9
    # The run stops only when the next call's worst case (256 output tokens + its prompt) no longer fits:
    worst_case = PriceTable.load().price("fake").cost_nano(20, 256)
    assert run["cost_nano"] > cap * 1e9 - worst_case

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
    again = run(idempotency_key="day-2")  # a new run of the same thing: all from cache
    assert (again["rows_succeeded"], again["rows_cached"], again["attempts"], again["cost_nano"]) == (30, 30, 0, 0)
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


def test_two_submits_at_once_enqueue_each_chunk_once(pipeline, tmp_path):
    """A scheduler that fires twice at the same moment: both submits race, every chunk is enqueued once."""
    import threading

    from pipeline.queue import connect

    dataset = write(tmp_path / "d.csv", tricky_rows(200))
    start = threading.Barrier(4)
    reports = []

    def submit() -> None:
        connection = connect(pipeline.settings)
        start.wait()
        reports.append(
            runs.submit(
                connection,
                pipeline.settings,
                runs.RunRequest(
                    dataset=dataset, template=TEMPLATE, id_column="id", chunk_size=5, idempotency_key="nightly@1"
                ),
            )
        )

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(reports) == 4 and len({r.run_id for r in reports}) == 1
    assert sum(r.jobs_enqueued for r in reports) == 40
    queued = pipeline.redis.lrange(f"rq:queue:{pipeline.settings.queue_name}", 0, -1)
    assert len(queued) == len(set(queued)) == 40


def test_a_submit_cut_off_half_way_is_finished_by_the_next_one(pipeline, tmp_path):
    """The idempotency key was recorded, then the submitting process died before its last chunks: submitting
    again enqueues just those, and the run completes."""
    from pipeline.queue import enqueued_key, job_id

    dataset = write(tmp_path / "d.csv", tricky_rows(30))
    report = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10, idempotency_key="day-1")
    queue_key = f"rq:queue:{pipeline.settings.queue_name}"
    lost = ["c000001", "c000002"]  # as if the process died before these
    for label in lost:
        pipeline.redis.lrem(queue_key, 0, job_id(report.run_id, label))
        pipeline.redis.srem(enqueued_key(report.run_id), label)
    pipeline.redis.delete(runs.submitted_key(report.run_id))

    again = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10, idempotency_key="day-1")
    assert (again.run_id, again.existing, again.jobs_enqueued) == (report.run_id, True, 2)
    assert pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10, idempotency_key="day-1").jobs_enqueued == 0
    pipeline.work()
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"]) == ("completed", 30)


def test_a_chunk_that_cannot_start_fails_its_rows_so_the_run_ends(pipeline, tmp_path):
    """The worker lacks the fallback's API key: retrying cannot help, so each row gets a failed result."""
    from pydantic import SecretStr

    pipeline.settings = pipeline.settings.model_copy(update={"anthropic_api_key": SecretStr("sk-ant-submitter")})
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(12)),
        TEMPLATE,
        id_column="id",
        chunk_size=5,
        fallbacks=["anthropic:claude-haiku-4-5"],
    )
    pipeline.settings = pipeline.settings.model_copy(update={"anthropic_api_key": None})
    pipeline.work()
    pipeline.collect()
    results = pipeline.results(report.run_id)
    assert len(results) == 12 and {r["status"] for r in results} == {"failed"}
    assert all("cannot start the chunk" in r["error"] and "ANTHROPIC_API_KEY" in r["error"] for r in results)
    assert "sk-ant-submitter" not in str(results)
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_failed"]) == ("completed", 12)


def test_a_chunk_failing_its_last_try_leaves_failed_rows_not_gaps(pipeline, tmp_path):
    """RQ calls the failure callback on every failure; after the last retry the rows that have no result yet
    get a failed one (retry-failed can send them again), rows already answered keep their answer."""
    from rq.job import Job

    from jobs.process_chunk import chunk_failed
    from pipeline import handoff
    from pipeline.queue import SERIALIZER, job_id
    from pipeline.records import SUCCEEDED, Result

    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(6)), TEMPLATE, id_column="id")
    job = Job.fetch(job_id(report.run_id, "c000000"), connection=pipeline.redis, serializer=SERIALIZER)
    assert job.failure_callback is chunk_failed and job.retries_left == pipeline.settings.job_retries
    answered = Result(
        run_id=report.run_id,
        row_key="id-00000",
        row_index=0,
        status=SUCCEEDED,
        input={"text": "x"},
        answer="kept",
        finished_at=1.0,
    )
    handoff.publish_results(pipeline.redis, pipeline.settings.result_stream, [answered])

    chunk_failed(job, pipeline.redis, RuntimeError, RuntimeError("boom"), None)  # retries left: nothing yet
    pipeline.collect()
    assert len(pipeline.results(report.run_id)) == 1
    job.retries_left = 0
    chunk_failed(job, pipeline.redis, RuntimeError, RuntimeError("boom"), None)
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert len(results) == 6 and results["id-00000"]["answer"] == "kept"
    assert all(
        r["status"] == "failed" and "failed on every try (RuntimeError: boom)" in r["error"]
        for k, r in results.items()
        if k != "id-00000"
    )
    assert pipeline.run_row(report.run_id)["status"] == "completed"


def test_a_cap_given_at_resume_counts_what_the_run_already_spent(pipeline, tmp_path):
    """Without a cap, spend is not tracked in Redis; a cap added by resume must start from the SQL total."""
    from pipeline.calls.budget import NANO

    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(20)), TEMPLATE, id_column="id")
    pipeline.work()
    pipeline.collect()
    spent = pipeline.run_row(report.run_id)["cost_nano"]
    assert spent > 0 and pipeline.redis.get(spend_key(report.run_id)) is None
    runs.resume(pipeline.redis, pipeline.settings, report.run_id, max_cost=spent * 3 / NANO, engine=pipeline.engine)
    assert int(pipeline.redis.get(spend_key(report.run_id))) == spent
    assert runs.load_config(pipeline.redis, report.run_id).max_cost == spent * 3 / NANO


def _race(calls, count: int = 2) -> tuple[list[int], list[str]]:
    """Run ``calls`` (one per thread) at the same moment; their return values and the errors they raised."""
    import threading

    from pipeline.errors import ConfigError

    start, done, refused = threading.Barrier(count), [], []

    def run(call) -> None:
        start.wait()
        try:
            done.append(call())
        except ConfigError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return done, refused


@pytest.mark.parametrize("command", ["resume", "retry-failed"])
def test_two_resumes_or_retries_at_once_enqueue_the_open_rows_once(pipeline, tmp_path, command):
    """The busy check and the enqueue are separate steps: without a claim on the run, two commands started
    together both pass the check and both enqueue every open row (each paid twice with --no-cache)."""
    from pydantic import SecretStr

    from pipeline.queue import connect

    dataset = write(tmp_path / "d.csv", tricky_rows(200))
    if command == "resume":
        report = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=5, use_cache=False)
        runs.cancel(pipeline.redis, pipeline.settings, report.run_id)
    else:  # every row fails: the worker lacks the fallback's key
        pipeline.settings = pipeline.settings.model_copy(update={"anthropic_api_key": SecretStr("sk-ant-x")})
        report = pipeline.submit(
            dataset, TEMPLATE, id_column="id", chunk_size=5, use_cache=False, fallbacks=["anthropic:claude-haiku-4-5"]
        )
        pipeline.settings = pipeline.settings.model_copy(update={"anthropic_api_key": None})
        pipeline.work()
        pipeline.collect()
        assert pipeline.run_row(report.run_id)["rows_failed"] == 200
    queue_key = f"rq:queue:{pipeline.settings.queue_name}"
    pipeline.redis.delete(queue_key)

    def one() -> int:
        connection = connect(pipeline.settings)
        if command == "resume":
            return runs.resume(connection, pipeline.settings, report.run_id)
        return runs.retry_failed(connection, pipeline.settings, pipeline.engine, report.run_id)

    done, refused = _race([one, one])
    assert done == [40] and len(refused) == 1, (done, refused)
    assert "\n" not in refused[0] and report.run_id in refused[0]
    queued = pipeline.redis.lrange(queue_key, 0, -1)
    assert len(queued) == len(set(queued)) == 40
