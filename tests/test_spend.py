"""What was billed reaches SQL, whatever happens to the row: an answer without usage, a budget stop or a cancel
after answers were billed, a call that timed out, a row answered twice. SQL spend equals the budget's Redis
spend to the nano-dollar, on SQLite and PostgreSQL, with the official SDKs against the fake provider."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions
from rq import Worker

from pipeline import handoff
from pipeline.calls.answer import estimate_tokens
from pipeline.calls.budget import RunBudget, holds_key, reserve_batch, spend_key
from pipeline.calls.redis_batch import RedisBatcher
from pipeline.collect.collector import Collector
from pipeline.collect.metrics import PipelineMetrics
from pipeline.control import runs
from pipeline.output.export import export_run
from pipeline.pricing import PriceTable
from pipeline.queue import SERIALIZER, chunk_queue

from . import processes
from .conftest import with_async_redis
from .datasets import write
from .fakeprovider import FakeProvider

TEMPLATE = "Q: {{ text }}"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"r{i}", "text": f"plain question number {i}"} for i in range(n)]


def submit_openai(pipeline, dataset, **options):
    """A run of the spend tests: one OpenAI model on the fake server, 40 output tokens at most, no cache."""
    return pipeline.submit(
        dataset,
        TEMPLATE,
        id_column="id",
        provider="openai",
        model="gpt-4o-mini",
        max_tokens=40,
        use_cache=False,
        **options,
    )


def worst_case(model: str, text: str, max_tokens: int) -> int:
    """The hold the pipeline reserves for one call: the prompt estimate and every output token, at the price."""
    return PriceTable.load().price(model).cost_nano(estimate_tokens(f"Q: {text}"), max_tokens)


def redis_spend(pipeline, run_id: str) -> int:
    return int(pipeline.redis.get(spend_key(run_id)) or 0)


def test_an_answer_without_usage_is_billed_at_its_worst_case_marked_and_counted(make_pipeline, tmp_path):
    """An OpenAI-compatible server (or an Anthropic proxy) that omits ``usage``: the budget settles to the
    reserved worst case, the token bucket keeps the estimate, the result says its usage is estimated, and
    ``pipeline_estimated_usage_answers`` counts it. (Before: cost 0 in SQL and Redis, the bucket refunded.)"""
    data = rows(2)
    with FakeProvider(usage=False) as server:
        pipeline = make_pipeline(**server.settings(), ratelimit_burst_seconds=100_000)
        metrics = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine)
        dataset = write(tmp_path / "d.csv", data)
        targets = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}
        reports = {
            provider: pipeline.submit(
                dataset,
                TEMPLATE,
                id_column="id",
                provider=provider,
                model=model,
                max_tokens=40,
                max_cost=1.0,
                use_cache=False,
                tpm=6,
            )
            for provider, model in targets.items()
        }
        started = _redis_time(pipeline)
        pipeline.work()
        elapsed = _redis_time(pipeline) - started
        Collector(pipeline.settings, pipeline.redis, pipeline.engine, observers=[metrics.observe]).run(burst=True)
        assert server.stats()["by_status"] == {"200": 4}

    for provider, model in targets.items():
        run_id = reports[provider].run_id
        results = pipeline.results(run_id)
        expected = {r["id"]: worst_case(model, r["text"], 40) for r in data}
        assert {r["row_key"]: r["cost_nano"] for r in results} == expected
        assert all(r["usage_estimated"] == 1 and r["output_tokens"] == 40 for r in results)
        assert pipeline.run_row(run_id)["cost_nano"] == redis_spend(pipeline, run_id) == sum(expected.values())
        counted = metrics.registry.get_sample_value(
            "pipeline_estimated_usage_answers_total", {"provider": provider, "model": model}
        )
        assert counted == 2
        export_run(pipeline.engine, run_id, "jsonl", tmp_path / f"{provider}.jsonl")
        exported = [json.loads(line) for line in (tmp_path / f"{provider}.jsonl").read_text().splitlines()]
        assert [r["usage_estimated"] for r in exported] == [1, 1]
    # The token bucket charged each call its prompt estimate and max output, and kept it (nothing refunded): its
    # theoretical arrival time is the first call's time plus that at the limit's rate (far ahead of the clock).
    rate = 6 * (1 - pipeline.settings.ratelimit_headroom) / 60
    charged = sum(estimate_tokens(f"Q: {r['text']}") + 40 for r in data)
    tat = float(pipeline.redis.get("ratelimit:openai:gpt-4o-mini:tokens"))
    assert charged - 0.01 <= (tat - started) * rate <= charged + elapsed * rate + 0.01
    print(
        f"no usage: SQL {sum(expected.values())} n$ = Redis {redis_spend(pipeline, run_id)} n$ per run "
        f"(before: 0 and 0); bucket kept {charged} tokens"
    )


def _redis_time(pipeline) -> float:
    seconds, micros = pipeline.redis.time()
    return seconds + micros / 1e6


def test_a_budget_stop_after_billed_answers_keeps_their_spend_and_resume_pays_only_the_rest(make_pipeline, tmp_path):
    """Two runs of one row, each with a cap of exactly one call's worst case: (a) the primary's answer cannot be
    read (billed at its estimate) and the fallback no longer fits; (b) the answer fails the JSON schema and its
    second try no longer fits. The billed spend reaches SQL as a ``stopped`` result; ``resume`` asks the row
    once more and adds to it. (Before: SQL 0 while Redis had the spend, and the resumed total was short.)"""
    (row,) = rows(1)
    with FakeProvider() as server:
        pipeline = make_pipeline(openai_api_key="sk-test", openai_base_url=f"{server.url}/v1")
        cap = worst_case("gpt-4o-mini", row["text"], 40) / 1e9
        fallback = submit_openai(
            pipeline,
            write(tmp_path / "a.csv", [row]),
            fallbacks=["openai:gpt-4o"],
            max_cost=cap,
        )
        schema = submit_openai(
            pipeline,
            write(tmp_path / "b.csv", [row]),
            json_schema=SCHEMA,
            max_cost=cap,
            name="schema",
        )
        server.configure(fail_next=["malformed"])
        pipeline.work()
        pipeline.collect()
        stopped = {run_id: pipeline.results(run_id) for run_id in (fallback.run_id, schema.run_id)}
        spend_at_stop = {run_id: redis_spend(pipeline, run_id) for run_id in stopped}
        status_at_stop = {run_id: pipeline.run_row(run_id)["status"] for run_id in stopped}
        calls_at_stop = server.stats()["requests"]

        server.configure(answers=[{"match": "Q:", "content": '{"label": "fine"}'}])
        enqueued = {
            run_id: runs.resume(pipeline.redis, pipeline.settings, run_id, max_cost=1.0, engine=pipeline.engine)
            for run_id in stopped
        }
        queued = _queue_state(pipeline, stopped)
        pipeline.work()
        pipeline.collect()
        calls = server.stats()["requests"]
        ran = _queue_state(pipeline, stopped)

    # one call each, then one more each on resume
    assert (calls_at_stop, calls) == (2, 4), f"resume enqueued {enqueued}; queued: {queued}; after work: {ran}"
    for run_id, (result,) in stopped.items():
        assert result["status"] == "stopped" and result["attempts"] == 1 and result["cost_nano"] > 0
        assert status_at_stop[run_id] == "budget_exhausted"
        assert result["cost_nano"] == spend_at_stop[run_id]
    assert stopped[fallback.run_id][0]["cost_nano"] == worst_case("gpt-4o-mini", row["text"], 40)
    for run_id in stopped:
        (final,) = pipeline.results(run_id)
        run = pipeline.run_row(run_id)
        assert (final["status"], final["attempts"], run["status"]) == ("succeeded", 2, "completed")
        assert run["cost_nano"] == final["cost_nano"] == redis_spend(pipeline, run_id) > spend_at_stop[run_id]
    print(f"budget stop: SQL {spend_at_stop} n$ = Redis at the stop (before: 0); 4 calls in all")


def _queue_state(pipeline, run_ids) -> dict[str, object]:
    """What a failed assertion needs to tell why jobs did (not) run: the chunk jobs' states and summaries, the
    queue, the workers registered on it, and each run's done marks."""
    connection = pipeline.redis
    queue = chunk_queue(connection, pipeline.settings)
    jobs = {
        job.id: (job.get_status(refresh=False), job.return_value())
        for run_id in run_ids
        for job in runs._run_jobs(connection, run_id)
    }
    return {
        "jobs": jobs,
        "queued": queue.get_job_ids(),
        "workers": [(w.name, w.hostname, w.pid) for w in Worker.all(queue=queue, serializer=SERIALIZER)],
        "done": {run_id: connection.hgetall(handoff.done_key(run_id)) for run_id in run_ids},
    }


def test_a_cancel_after_a_billed_answer_keeps_its_spend(make_pipeline, tmp_path):
    """The answer fails the JSON schema; its second try waits for the rate limit (1 a minute) and the run is
    cancelled meanwhile: the billed answer reaches SQL as a ``stopped`` result. (Before: no result, SQL 0.)"""
    with FakeProvider() as server:
        pipeline = make_pipeline(
            openai_api_key="sk-test", openai_base_url=f"{server.url}/v1", ratelimit_burst_seconds=61
        )
        report = submit_openai(
            pipeline,
            write(tmp_path / "d.csv", rows(1)),
            json_schema=SCHEMA,
            max_cost=1.0,
            rpm=1,
        )

        def cancel_after_first_answer() -> None:
            processes.wait_for(lambda: server.stats()["by_status"].get("200") == 1, 60, "the first answer")
            runs.cancel(pipeline.redis, pipeline.settings, report.run_id)

        canceller = threading.Thread(target=cancel_after_first_answer)
        canceller.start()
        pipeline.work()
        canceller.join()
        pipeline.collect()
        assert server.stats()["requests"] == 1
    (result,) = pipeline.results(report.run_id)
    assert result["status"] == "stopped" and "cancelled" in result["error"] and result["cost_nano"] > 0
    run = pipeline.run_row(report.run_id)
    assert run["status"] == "cancelled"
    assert run["cost_nano"] == result["cost_nano"] == redis_spend(pipeline, report.run_id)
    print(f"cancel: SQL {run['cost_nano']} n$ = Redis {redis_spend(pipeline, report.run_id)} n$ (before: SQL 0)")


def test_a_budget_hold_lives_as_long_as_its_call_can(make_pipeline, tmp_path):
    """REQUEST_TIMEOUT of 700 s: the hold a call takes must not expire while the call may still run (before: a
    fixed 600 s, so a slow call's worst case left the budget and other calls could overspend the cap)."""
    with FakeProvider(latency=1.0) as server:
        pipeline = make_pipeline(openai_api_key="sk-test", openai_base_url=f"{server.url}/v1", request_timeout=700)
        report = submit_openai(
            pipeline,
            write(tmp_path / "d.csv", rows(1)),
            max_cost=1.0,
        )
        seen: list[float] = []

        def watch_the_hold() -> None:
            key = holds_key(report.run_id)
            processes.wait_for(lambda: pipeline.redis.zcard(key) == 1, 60, "the call's budget hold")
            ((_, expires),) = pipeline.redis.zrange(key, 0, -1, withscores=True)
            seen.append(expires - _redis_time(pipeline))

        watcher = threading.Thread(target=watch_the_hold)
        watcher.start()
        pipeline.work()
        watcher.join()
    assert seen and seen[0] > 700
    print(f"hold lives {seen[0]:.0f} s with REQUEST_TIMEOUT=700 (before: 600 s)")


def test_a_cancel_ends_a_wait_for_room_in_the_budget(make_pipeline, tmp_path):
    """Another worker's hold leaves no room for this row's call, so the row waits for it to settle; a cancel
    ends that wait at once (before: the row waited until the other hold expired, here an hour)."""
    with FakeProvider() as server:
        pipeline = make_pipeline(openai_api_key="sk-test", openai_base_url=f"{server.url}/v1")
        report = submit_openai(
            pipeline,
            write(tmp_path / "d.csv", rows(1)),
            max_cost=0.001,
            rpm=60_000,
        )  # its bucket's key appears as the row takes its place, just before

        async def hold_most_of_the_budget() -> None:
            client = aioredis.Redis.from_url(pipeline.settings.redis_url)
            try:
                await RunBudget(client, report.run_id, 0.001, hold_seconds=3600).reserve(999_000)
            finally:
                await client.aclose()

        asyncio.run(hold_most_of_the_budget())
        worker = processes.start(["worker.py", "--burst"], pipeline.env())
        try:
            processes.wait_for(
                lambda: pipeline.redis.exists("ratelimit:openai:gpt-4o-mini:requests"),
                60,
                "the row to reach the budget",
            )
            runs.cancel(pipeline.redis, pipeline.settings, report.run_id)
            assert worker.wait(timeout=60) == 0
        finally:
            processes.kill_tree(worker)
        assert server.stats()["requests"] == 0
    assert pipeline.redis.hlen(handoff.done_key(report.run_id)) == 0  # the row is left for resume


def test_a_timed_out_call_is_spend_in_sql_too(make_pipeline, tmp_path):
    """A call that times out may be billed: its worst case is spent in Redis, and now on the row's result in
    SQL as well (before: Redis had it, SQL did not)."""
    (row,) = rows(1)
    with FakeProvider(hang_seconds=3) as server:
        pipeline = make_pipeline(openai_api_key="sk-test", openai_base_url=f"{server.url}/v1", request_timeout=0.5)
        report = submit_openai(
            pipeline,
            write(tmp_path / "d.csv", [row]),
            max_cost=1.0,
        )
        server.configure(fail_next=["hang"])
        pipeline.work()
        pipeline.collect()
    (result,) = pipeline.results(report.run_id)
    timed_out = worst_case("gpt-4o-mini", row["text"], 40)
    assert (result["status"], result["timeouts"], result["attempts"], result["usage_estimated"]) == (
        "succeeded",
        1,
        2,
        1,
    )
    assert result["cost_nano"] > timed_out
    assert pipeline.run_row(report.run_id)["cost_nano"] == result["cost_nano"] == redis_spend(pipeline, report.run_id)
    print(f"timeout: SQL {result['cost_nano']} n$ = Redis (before: SQL {result['cost_nano'] - timed_out} n$)")


def test_a_second_paid_answer_to_a_row_reaches_sql_totals_once(pipeline, tmp_path):
    """A duplicated or resumed chunk answers a row that already has its answer: the row keeps the first, but
    the second was paid for and counts, once, however often its entry is delivered (before: 2000 n$ in SQL for
    3400 paid)."""
    from pipeline.records import SUCCEEDED, Result

    report = pipeline.submit(write(tmp_path / "d.csv", rows(2)), TEMPLATE, id_column="id")
    pipeline.redis.delete(f"rq:queue:{pipeline.settings.queue_name}")  # this test plays the workers

    def answer(i: int, cost: int, worker: str) -> Result:
        return Result(
            run_id=report.run_id,
            row_key=f"r{i}",
            row_index=i,
            status=SUCCEEDED,
            input={"text": "q"},
            answer=f"by {worker}",
            provider="openai",
            model="gpt-4o-mini",
            attempts=1,
            input_tokens=3,
            output_tokens=2,
            cost_nano=cost,
            finished_at=1000.0 + i,
            calls={"openai|gpt-4o-mini|200": 1},
        )

    first, second = [answer(i, 1000, "a") for i in range(2)], [answer(i, 700, "b") for i in range(2)]
    stream = pipeline.settings.result_stream
    handoff.publish_results(pipeline.redis, stream, [*first, second[0]])  # r0 twice in one batch
    pipeline.collect()
    handoff.publish_results(pipeline.redis, stream, [second[1]])  # r1's second answer in a later one
    pipeline.collect()
    handoff.publish_results(pipeline.redis, stream, [*second, *first])  # every entry delivered again
    pipeline.collect()
    results = pipeline.results(report.run_id)
    assert [(r["answer"], r["cost_nano"], r["attempts"], r["calls"]) for r in results] == [
        ("by a", 1700, 2, {"openai|gpt-4o-mini|200": 2})
    ] * 2
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"], run["cost_nano"], run["attempts"], run["input_tokens"]) == (
        "completed",
        2,
        3400,
        4,
        12,
    )


def test_results_tables_without_the_new_columns_are_refused_until_upgraded_as_the_readme_says(database_url):
    import re

    import pytest
    from sqlalchemy import create_engine, text

    from pipeline.collect import store
    from pipeline.errors import ConfigError

    from .conftest import ROOT

    store.make_engine(database_url).dispose()
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for column in ("usage_estimated", "generation", "result_id"):
            conn.execute(text(f"ALTER TABLE results DROP COLUMN {column}"))
    with pytest.raises(ConfigError, match=r"older version .* 'Upgrading a database'"):
        store.make_engine(database_url)
    readme = (ROOT / "README.md").read_text()
    with engine.begin() as conn:
        for statement in re.findall(
            r"^ALTER TABLE results ADD COLUMN (?:usage_estimated|generation|result_id).*;$", readme, re.MULTILINE
        ):
            conn.execute(text(statement))
    engine.dispose()
    store.make_engine(database_url).dispose()


def test_a_hold_that_fails_fails_its_row_only_and_leaves_no_hold_behind(redis_url):
    """The holds of one loop tick go out as one script call: a run whose holds key is broken (a key of the wrong
    type) fails its own rows, while another run's rows in the same call still take their holds, each once."""

    async def scenario(client):
        await client.hset(holds_key("broken"), "not", "a set of holds")
        reads = RedisBatcher(client, transaction=False)
        good, broken = (RunBudget(client, run, 1.0, hold_seconds=60, reads=reads) for run in ("good", "broken"))
        outcomes = await asyncio.gather(
            good.reserve(100), broken.reserve(100), good.reserve(200), return_exceptions=True
        )
        return outcomes, await client.zrange(holds_key("good"), 0, -1)

    (first, failed, second), held = with_async_redis(scenario, redis_url)
    assert isinstance(failed, redis.exceptions.ResponseError) and "WRONGTYPE" in str(failed)
    assert first.endswith(":100") and second.endswith(":200")
    assert sorted(held) == sorted([first.encode(), second.encode()])
    with (
        redis.Redis.from_url(redis_url) as connection,
        pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"),
    ):
        reserve_batch(connection, "broken", 1.0, 100, 60)  # batch mode's own call: raises, as before
