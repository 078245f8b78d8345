"""Batch mode against the fake provider's batch APIs, through the official SDKs; real RQ workers, Redis, SQL.

The tests drive the pipeline as its processes would: burst workers, a burst collector, and RQ's scheduled jobs
(the poll jobs) moved to the queue once due, as ``worker.py``'s scheduler does.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from rq import Worker
from rq.job import Job

from pipeline.calls import batchstate
from pipeline.calls.batches import BatchRunner
from pipeline.calls.workers import recover_chunks_of
from pipeline.collect import store
from pipeline.collect.metrics import PipelineMetrics
from pipeline.control import runs
from pipeline.errors import ConfigError
from pipeline.pricing import PriceTable
from pipeline.queue import SERIALIZER, chunk_queue

from . import processes
from .datasets import write

TEMPLATE = "Say: {{ text }}"
ONE_WORKER = (
    "from pipeline.settings import load_settings; from pipeline.calls.workers import run_worker; "
    "run_worker(load_settings())"
)
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture
def database_url(tmp_path):
    """SQLite only: these tests are about providers and queues; test_batch_store covers both databases."""
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture
def batch_pipeline(make_pipeline, server):
    def make(**overrides):
        values = dict(
            server.settings(),
            batch_poll_seconds=1,
            batch_poll_max_seconds=1,
            batch_wait_seconds=1,
            job_retries=2,
            request_timeout=0.25,
        )  # a create's lease: 17 x 0.25 s
        values.update(overrides)
        return make_pipeline(**values)

    return make


def rows(n: int, prefix: str = "row") -> list[dict[str, str]]:
    return [{"id": f"{i:04d}", "text": f"{prefix} {i} — ü"} for i in range(n)]


def submit(pipeline, tmp_path, data, provider, **fields):
    fields.setdefault("chunk_size", 10)
    path = write(tmp_path / f"d{time.monotonic_ns()}.jsonl", data)
    return pipeline.submit(
        path, TEMPLATE, id_column="id", provider=provider, model=MODELS[provider], mode="batch", **fields
    ).run_id


def move_due_jobs(pipeline) -> int:
    """What RQ's scheduler does in worker.py: scheduled jobs whose time came go to the queue."""
    queue = chunk_queue(pipeline.redis, pipeline.settings)
    registry = queue.scheduled_job_registry
    due = registry.get_jobs_to_schedule()
    for job in Job.fetch_many(due, connection=pipeline.redis, serializer=SERIALIZER):
        if job is not None:
            registry.remove(job)
            queue.enqueue_job(job)
    return len(due)


def drive(pipeline, until, timeout: float = 30.0, what: str = "the run") -> None:
    """Work, collect and move due poll jobs until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        move_due_jobs(pipeline)
        pipeline.work()
        pipeline.collect()
        if until():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def results(pipeline, run_id):
    return {r["row_key"]: r for r in pipeline.results(run_id)}


def settled(pipeline, run_id, count):
    return lambda: len(pipeline.results(run_id)) >= count and not batchstate.open_batch_count(pipeline.redis, run_id)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_batch_run_lands_in_sql_with_its_batch_at_half_price_and_cached_rows_skip_the_batch(
    batch_pipeline, server, tmp_path, provider
):
    pipeline = batch_pipeline()
    data = rows(24)
    data.insert(9, {"id": "dup", "text": "row 3 — ü"})  # row 3's prompt again, in its chunk: asked once
    run_id = submit(pipeline, tmp_path, data, provider)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    found = results(pipeline, run_id)
    online, batch = PriceTable.load().price(MODELS[provider]), PriceTable.load().batch_price(provider, MODELS[provider])
    batch_ids = {r["batch_id"] for r in found.values()}
    assert len(found) == 25 and all(r["status"] == "succeeded" for r in found.values())
    assert len(batch_ids) == 3 and None not in batch_ids  # one batch per chunk of 10
    for row in data:
        result = found[row["id"]]
        assert result["answer"] == f"ECHO: Say: {row['text']}"
        assert result["cost_nano"] == batch.cost_nano(result["input_tokens"], result["output_tokens"])
        assert abs(2 * result["cost_nano"] - online.cost_nano(result["input_tokens"], result["output_tokens"])) <= 1
    stats = server.stats()
    assert stats["batches_created"] == 3 and stats["batch_items"] == 24
    assert (found["dup"]["cached"], found["dup"]["cost_nano"], found["dup"]["batch_id"]) == (
        True,
        0,
        found["0003"]["batch_id"],
    )
    assert "/v1/chat/completions" not in stats["by_path"] and "/v1/messages" not in stats["by_path"]
    info = runs.run_status(pipeline.redis, pipeline.engine, run_id)
    assert info["batches"] == {"completed": 3} and info["cost_usd"] > 0

    again = submit(pipeline, tmp_path, data, provider, idempotency_key="second")  # every prompt is cached now
    drive(pipeline, lambda: pipeline.run_row(again)["status"] == "completed")
    cached = results(pipeline, again)
    assert all(r["cached"] and r["batch_id"] is None and r["cost_nano"] == 0 for r in cached.values())
    assert server.stats()["batches_created"] == 3


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_answers_an_online_run_paid_for_answer_a_batch_run_from_the_cache(batch_pipeline, server, tmp_path, provider):
    pipeline = batch_pipeline()
    data = rows(6)
    online = pipeline.submit(
        write(tmp_path / "d.jsonl", data), TEMPLATE, id_column="id", provider=provider, model=MODELS[provider]
    ).run_id
    drive(pipeline, lambda: pipeline.run_row(online)["status"] == "completed")
    batch = submit(pipeline, tmp_path, data, provider)
    drive(pipeline, lambda: pipeline.run_row(batch)["status"] == "completed")
    assert all(r["cached"] and r["answer"].startswith("ECHO:") for r in results(pipeline, batch).values())
    assert server.stats()["batches_created"] == 0 and server.stats()["requests"] == 6


def test_batch_mode_is_refused_for_providers_without_a_batch_api(batch_pipeline, tmp_path):
    pipeline = batch_pipeline()
    path = write(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(ConfigError, match="--mode batch needs a provider with a batch API"):
        pipeline.submit(path, TEMPLATE, provider="fake", model="fake", mode="batch")
    with pytest.raises(ConfigError, match="a openai batch holds at most 50,000 requests"):
        pipeline.submit(path, TEMPLATE, provider="openai", model="gpt-4o-mini", mode="batch", chunk_size=50_001)
    with pytest.raises(ConfigError, match="--fallback cannot be used with --mode batch"):
        pipeline.submit(
            path,
            TEMPLATE,
            provider="openai",
            model="gpt-4o-mini",
            mode="batch",
            fallbacks=["anthropic:claude-haiku-4-5"],
        )
    embedded = pipeline.settings.model_copy(update={"redis_url": None})
    with pytest.raises(ConfigError, match="--mode batch needs a Redis server"):
        runs.validate(
            embedded,
            runs.RunRequest(dataset=path, template=TEMPLATE, provider="openai", model="gpt-4o-mini", mode="batch"),
        )


def test_a_dry_run_of_a_batch_run_prices_it_at_the_batch_price(batch_pipeline, tmp_path):
    pipeline = batch_pipeline()
    path = write(tmp_path / "d.jsonl", rows(10))
    cost = {
        mode: runs.dry_run(
            pipeline.redis,
            pipeline.settings,
            runs.RunRequest(dataset=path, template=TEMPLATE, provider="openai", model="gpt-4o-mini", mode=mode),
        ).cost_usd
        for mode in ("online", "batch")
    }
    assert cost["batch"] == pytest.approx(cost["online"] / 2, rel=1e-6)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_batch_whose_create_reply_was_lost_is_found_again_not_made_twice(batch_pipeline, server, tmp_path, provider):
    """The provider made the batch but the worker never recorded its id (the reply was lost, as when the worker
    dies right after the create call): the next look finds it by its chunk id and adopts it."""
    server.configure(batch_lose_create=1)
    pipeline = batch_pipeline()
    run_id = submit(pipeline, tmp_path, rows(20), provider)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    found = results(pipeline, run_id)
    assert len(found) == 20 and all(r["status"] == "succeeded" for r in found.values())
    assert server.stats()["batches_created"] == 2  # one per chunk: 0 extra
    assert set(server.stats()["paid"].values()) == {1}
    assert {r["batch_id"] for r in found.values()} == set(server.batches.batches)


def test_a_worker_killed_between_the_create_call_and_its_record_leaves_no_extra_batch(batch_pipeline, server, tmp_path):
    """A worker process is SIGKILLed while the provider has made the batch and its reply is on the way. The
    chunk comes back (as worker.py's pool gives a dead worker's chunks back), runs again, finds the batch and
    makes none. (One bare worker process: a pool could respawn a child that takes the chunk as it is killed.)"""
    server.configure(batch_hang_create=1, hang_seconds=3)
    pipeline = batch_pipeline()
    run_id = submit(pipeline, tmp_path, rows(10), "openai")
    worker = processes.start(["-c", ONE_WORKER], pipeline.env())
    try:
        processes.wait_for(lambda: server.stats()["batches_created"] == 1, 60, "the create call")
    finally:
        processes.kill_tree(worker)
    (record,) = batchstate.run_batches(pipeline.redis, run_id)
    assert record.batch_id is None and record.extra["creating"].startswith("1:")  # made, never recorded
    for dead in Worker.all(connection=pipeline.redis, serializer=SERIALIZER):
        recover_chunks_of(pipeline.redis, pipeline.settings, dead.name)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    assert server.stats()["batches_created"] == 1  # 0 extra
    assert {r["batch_id"] for r in pipeline.results(run_id)} == set(server.batches.batches)
    assert set(server.stats()["paid"].values()) == {1}


def test_a_batch_recorded_in_sql_is_adopted_by_resume_after_redis_lost_the_run(batch_pipeline, server, tmp_path):
    """Redis loses the run's state while its batch is open: the collector has kept the batch in SQL, so the
    chunk that ``resume`` sends again follows that batch instead of paying for a second one."""
    server.configure(batch_delay=2)
    pipeline = batch_pipeline()
    run_id = submit(pipeline, tmp_path, rows(10), "openai")
    pipeline.work()  # the chunk creates its batch
    pipeline.collect()
    (batch_id,) = server.batches.batches
    with pipeline.engine.connect() as conn:
        (recorded,) = store.chunk_batches(conn, run_id, "c000000")
    assert (recorded["batch_id"], recorded["state"], recorded["round"]) == (batch_id, "created", 1)
    pipeline.redis.flushdb()  # Redis lost the run, its batch open

    runs.resume(pipeline.redis, pipeline.settings, run_id, engine=pipeline.engine)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    assert server.stats()["batches_created"] == 1  # 0 extra
    assert {r["batch_id"] for r in pipeline.results(run_id)} == {batch_id} and len(pipeline.results(run_id)) == 10
    assert set(server.stats()["paid"].values()) == {1}
    with pipeline.engine.connect() as conn:
        assert store.chunk_batches(conn, run_id, "c000000")[0]["state"] == "completed"


def test_a_second_job_on_a_slot_whose_batch_is_being_created_waits_instead_of_creating(
    batch_pipeline, server, tmp_path
):
    """While one job's create call is in flight (its lease is live), another job on the same slot (an RQ retry of
    a chunk thought dead) creates nothing; once the call is over it finds the batch."""
    server.configure(batch_hang_create=1, hang_seconds=2)  # longer than the client's 1 s timeout
    pipeline = batch_pipeline()
    run_id = submit(pipeline, tmp_path, rows(10), "openai")
    second: list[float | None] = []

    def second_job() -> None:
        processes.wait_for(lambda: server.stats()["batches_created"] == 1, 30, "the first job's create call")
        (record,) = batchstate.run_batches(pipeline.redis, run_id)
        config = runs.load_config(pipeline.redis, run_id)
        second.append(BatchRunner(pipeline.settings, pipeline.redis, config).advance(record.slot))

    beside = threading.Thread(target=second_job)
    beside.start()
    pipeline.work()  # the first job, creating the batch
    beside.join()
    assert second == [1]  # made nothing: look again in 1 s
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    assert server.stats()["batches_created"] == 1 and len(pipeline.results(run_id)) == 10


def test_an_expired_batch_sends_only_its_missing_items_again(batch_pipeline, server, tmp_path):
    server.configure(batch_plan=[{"keep": 4, "end": "expired"}])
    pipeline = batch_pipeline()
    run_id = submit(pipeline, tmp_path, rows(10), "openai")
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    found = results(pipeline, run_id)
    first, second = sorted(server.batches.batches.values(), key=lambda b: b.created)
    assert (first.final, len(first.items), second.final, len(second.items)) == ("expired", 10, "completed", 6)
    assert all(r["status"] == "succeeded" for r in found.values())
    assert [r["batch_id"] for r in found.values()] == [first.id] * 4 + [second.id] * 6  # in row order
    assert set(server.stats()["paid"].values()) == {1} and server.stats()["batch_items"] == 10
    assert sorted(r["attempts"] for r in found.values()) == [1] * 4 + [2] * 6
    assert runs.run_status(pipeline.redis, pipeline.engine, run_id)["batches"] == {"expired": 1, "completed": 1}


def test_items_that_keep_failing_fail_after_the_last_round_and_permanent_errors_at_once(
    batch_pipeline, server, tmp_path
):
    server.configure(rules=[{"match": "row 1 ", "action": 500}, {"match": "row 2 ", "action": 400}])
    pipeline = batch_pipeline(batch_max_rounds=2)
    run_id = submit(pipeline, tmp_path, rows(5), "anthropic")
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    found = results(pipeline, run_id)
    assert [k for k, r in found.items() if r["status"] == "failed"] == ["0001", "0002"]
    assert "api_error" in found["0001"]["error"] and found["0001"]["attempts"] == 2
    assert "invalid_request_error" in found["0002"]["error"] and found["0002"]["attempts"] == 1
    assert [len(b.items) for b in sorted(server.batches.batches.values(), key=lambda b: b.created)] == [5, 1]


def test_cancel_cancels_the_providers_batch_keeps_what_it_finished_and_resume_sends_only_the_rest(
    batch_pipeline, server, tmp_path
):
    server.configure(batch_plan=[{"keep": 3, "end": "stall"}])
    pipeline = batch_pipeline()
    data = rows(10)
    run_id = submit(pipeline, tmp_path, data, "anthropic")
    drive(pipeline, lambda: runs.run_status(pipeline.redis, pipeline.engine, run_id)["batches"] == {"in_progress": 1})
    scrape = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine).registry.get_sample_value
    assert scrape("pipeline_batches", {"state": "in_progress"}) == 1
    assert scrape("pipeline_batches", {"state": "completed"}) == 0
    assert 0 <= scrape("pipeline_batch_oldest_open_age_seconds") < 60
    assert 86000 < scrape("pipeline_batch_expiry_seconds") <= 86400  # the fake's 24 h window
    runs.cancel(pipeline.redis, pipeline.settings, run_id)
    drive(pipeline, lambda: not batchstate.open_batch_count(pipeline.redis, run_id), what="the cancelled batch")
    found = results(pipeline, run_id)
    assert server.stats()["batches_cancelled"] == 1
    assert sorted(found) == ["0000", "0001", "0002"] and all(r["status"] == "succeeded" for r in found.values())
    info = runs.run_status(pipeline.redis, pipeline.engine, run_id)
    assert (info["status"], info["rows_pending"], info["batches"]) == ("cancelled", 7, {"cancelled": 1})
    assert scrape("pipeline_batches", {"state": "cancelled"}) == 1 and scrape("pipeline_batch_expiry_seconds") is None

    runs.resume(pipeline.redis, pipeline.settings, run_id, engine=pipeline.engine)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    assert len(results(pipeline, run_id)) == 10
    assert [len(b.items) for b in sorted(server.batches.batches.values(), key=lambda b: b.created)] == [10, 7]
    assert set(server.stats()["paid"].values()) == {1}


def test_open_batches_stay_under_the_enqueued_token_limit_from_settings(batch_pipeline, server, tmp_path):
    """Two chunks whose batches together pass the limit: the second waits until the first has ended. The fake
    server enforces the same limit, and refuses nothing."""
    data = [{"id": f"{i:04d}", "text": f"row {i:02d}"} for i in range(20)]
    pipeline = batch_pipeline()
    probe = runs.validate(
        pipeline.settings, runs.RunRequest(dataset=write(tmp_path / "p.jsonl", data[:1]), template=TEMPLATE)
    )
    per_item = -(-len(f"Say: {data[0]['text']}".encode()) // 3) + probe.max_tokens
    limit = 15 * per_item  # one chunk of 10 fits, two do not
    server.configure(batch_token_limit=limit, batch_delay=1.5)
    pipeline = batch_pipeline(batch_enqueued_tokens={MODELS["openai"]: limit})
    run_id = submit(pipeline, tmp_path, data, "openai")
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    first, second = sorted(server.batches.batches.values(), key=lambda b: b.created)
    assert server.stats()["batches_refused"] == 0 and second.created >= first.ends_at
    assert all(r["status"] == "succeeded" for r in results(pipeline, run_id).values())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_provider_refusing_a_batch_for_its_enqueued_token_limit_is_waited_for_not_failed(
    batch_pipeline, server, tmp_path, provider
):
    server.configure(batch_token_limit=10 * 300, batch_delay=1.5)  # a chunk of 10 fits, two do not
    pipeline = batch_pipeline()
    run_id = submit(pipeline, tmp_path, rows(20), provider)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    found = results(pipeline, run_id)
    assert server.stats()["batches_refused"] >= 1
    assert len(found) == 20 and all(r["status"] == "succeeded" for r in found.values())
    assert set(server.stats()["paid"].values()) == {1}


def test_max_cost_stops_before_a_batch_whose_worst_case_would_pass_it(batch_pipeline, server, tmp_path):
    data = [{"id": f"{i:04d}", "text": f"row {i:02d}"} for i in range(20)]  # every prompt the same size
    pipeline = batch_pipeline()
    price = PriceTable.load().batch_price("openai", MODELS["openai"])
    per_item = price.cost_nano(-(-len(f"Say: {data[0]['text']}".encode()) // 3), 256)
    cap = (10 * per_item + 1) / 1e9  # one chunk's worst case, and a nano-dollar
    run_id = submit(pipeline, tmp_path, data, "openai", max_cost=cap)
    drive(
        pipeline,
        lambda: (
            pipeline.run_row(run_id)["status"] == "budget_exhausted"
            and not batchstate.open_batch_count(pipeline.redis, run_id)
        ),
    )
    assert server.stats()["batches_created"] == 1
    info = runs.run_status(pipeline.redis, pipeline.engine, run_id)
    assert (info["rows_succeeded"], info["rows_pending"]) == (10, 10)
    assert info["cost_usd"] <= cap


def test_the_cli_submits_a_batch_run_from_a_runs_file_and_status_shows_its_batches(batch_pipeline, tmp_path):
    pipeline = batch_pipeline()
    write(tmp_path / "d.jsonl", rows(12))
    (tmp_path / "runs.toml").write_text(
        '[runs.nightly]\ndataset = "d.jsonl"\ntemplate = "Say: {{ text }}"\n'
        'provider = "anthropic"\nmodel = "claude-haiku-4-5"\nid_column = "id"\n'
        'mode = "batch"\n',
        encoding="utf-8",
    )
    env = pipeline.env()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return processes.run_script(["enqueue.py", *args], env)

    refused = cli("submit", str(tmp_path / "d.jsonl"), "-t", TEMPLATE, "--mode", "batch")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: --mode batch needs a provider with a batch API (openai, anthropic); fake has none"
    ]
    run_id = json.loads(cli("submit", "--config", str(tmp_path / "runs.toml"), "--name", "nightly", "--json").stdout)[
        "run_id"
    ]
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    status = cli("status", run_id).stdout
    assert "batches    0 created, 0 in progress, 1 completed, 0 expired" in status
