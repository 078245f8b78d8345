"""Batch mode against the fake provider's batch APIs, through the official SDKs; real RQ workers, Redis, SQL.

The tests drive the pipeline as its processes would: burst workers, a burst collector, and RQ's scheduled jobs
(the poll jobs) moved to the queue once due, as ``worker.py``'s scheduler does.
"""
from __future__ import annotations

import time

import pytest
from rq.job import Job

from pipeline import batchstate, runs
from pipeline.errors import ConfigError
from pipeline.pricing import PriceTable
from pipeline.queue import SERIALIZER, chunk_queue

from .datasets import write
from .fakeprovider import FakeProvider

TEMPLATE = "Say: {{ text }}"
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture
def server():
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def batch_pipeline(make_pipeline, server):
    def make(**overrides):
        values = dict(openai_api_key="sk-test-openai", openai_base_url=f"{server.url}/v1",
                      anthropic_api_key="sk-ant-test", anthropic_base_url=server.url,
                      batch_poll_seconds=1, batch_poll_max_seconds=1, batch_wait_seconds=1, job_retries=2)
        values.update(overrides)
        return make_pipeline(**values)
    return make


def rows(n: int, prefix: str = "row") -> list[dict[str, str]]:
    return [{"id": f"{i:04d}", "text": f"{prefix} {i} — ü"} for i in range(n)]


def submit(pipeline, tmp_path, data, provider, **fields):
    fields.setdefault("chunk_size", 10)
    path = write(tmp_path / f"d{time.monotonic_ns()}.jsonl", data)
    return pipeline.submit(path, TEMPLATE, id_column="id", provider=provider, model=MODELS[provider],
                           mode="batch", **fields).run_id


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
        batch_pipeline, server, tmp_path, provider):
    pipeline = batch_pipeline()
    data = rows(24) + [{"id": "dup", "text": "row 3 — ü"}]      # the same prompt as row 3, in the last chunk
    run_id = submit(pipeline, tmp_path, data, provider)
    drive(pipeline, lambda: pipeline.run_row(run_id)["status"] == "completed")
    found = results(pipeline, run_id)
    online, batch = PriceTable.load().price(MODELS[provider]), PriceTable.load().batch_price(provider, MODELS[provider])
    batch_ids = {r["batch_id"] for r in found.values()}
    assert len(found) == 25 and all(r["status"] == "succeeded" for r in found.values())
    assert len(batch_ids) == 3 and None not in batch_ids                     # one batch per chunk of 10
    for row in data:
        result = found[row["id"]]
        assert result["answer"] == f"ECHO: Say: {row['text']}"
        assert result["cost_nano"] == batch.cost_nano(result["input_tokens"], result["output_tokens"])
        assert abs(2 * result["cost_nano"] - online.cost_nano(result["input_tokens"], result["output_tokens"])) <= 1
    stats = server.stats()
    assert stats["batches_created"] == 3 and stats["batch_items"] == 25      # dup asked again: in another chunk
    assert "/v1/chat/completions" not in stats["by_path"] and "/v1/messages" not in stats["by_path"]
    info = runs.run_status(pipeline.redis, pipeline.engine, run_id)
    assert info["batches"] == {"completed": 3} and info["cost_usd"] > 0

    again = submit(pipeline, tmp_path, data, provider, idempotency_key="second")   # every prompt is cached now
    drive(pipeline, lambda: pipeline.run_row(again)["status"] == "completed")
    cached = results(pipeline, again)
    assert all(r["cached"] and r["batch_id"] is None and r["cost_nano"] == 0 for r in cached.values())
    assert server.stats()["batches_created"] == 3


def test_batch_mode_is_refused_for_providers_without_a_batch_api(batch_pipeline, tmp_path):
    pipeline = batch_pipeline()
    path = write(tmp_path / "d.jsonl", rows(3))
    with pytest.raises(ConfigError, match="--mode batch needs a provider with a batch API"):
        pipeline.submit(path, TEMPLATE, provider="fake", model="fake", mode="batch")
    with pytest.raises(ConfigError, match="--fallback cannot be used with --mode batch"):
        pipeline.submit(path, TEMPLATE, provider="openai", model="gpt-4o-mini", mode="batch",
                        fallbacks=["anthropic:claude-haiku-4-5"])
