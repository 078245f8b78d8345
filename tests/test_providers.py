"""Real providers through the official SDKs, pointed at our fake provider server; real RQ workers and Redis."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.pricing import PriceTable

from . import processes
from .datasets import write

TEMPLATE = "Say: {{ text }}"


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


@pytest.fixture
def provider_pipeline(make_pipeline, server):
    def make(**overrides):
        values = dict(server.settings(), max_attempts=4)
        values.update(overrides)
        return make_pipeline(**values)

    return make


def rows(n: int, prefix: str = "row") -> list[dict[str, str]]:
    return [{"id": f"{i:04d}", "text": f"{prefix} {i} — ünïcode"} for i in range(n)]


def run_all(pipeline, tmp_path, data, **fields):
    report = pipeline.submit(write(tmp_path / "d.jsonl", data), TEMPLATE, id_column="id", **fields)
    pipeline.work()
    pipeline.collect()
    return report.run_id, {r["row_key"]: r for r in pipeline.results(report.run_id)}


@pytest.mark.parametrize(
    "provider,model", [("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5"), ("compatible", "llama-3-8b")]
)
def test_each_provider_answers_through_its_sdk(provider_pipeline, server, tmp_path, provider, model):
    pipeline = provider_pipeline()
    data = rows(20)
    run_id, results = run_all(pipeline, tmp_path, data, provider=provider, model=model, system_prompt="Be terse.")
    prices = PriceTable.load()
    for row in data:
        result = results[row["id"]]
        prompt = f"Say: {row['text']}"
        assert (result["status"], result["answer"], result["provider"]) == ("succeeded", "ECHO: " + prompt, provider)
        assert result["output_tokens"] == -(-len("ECHO: " + prompt) // 4)
        price = prices.price(model)  # the compatible server's model has no price: cost unknown
        expected = price.cost_nano(result["input_tokens"], result["output_tokens"]) if price else None
        assert result["cost_nano"] == expected
    stats = server.stats()
    assert stats["requests"] == 20 and stats["auth_seen"] == 20
    assert set(stats["paid"].values()) == {1}
    run = pipeline.run_row(run_id)
    assert run["input_tokens"] == sum(r["input_tokens"] for r in results.values())


def test_a_burst_of_429s_is_absorbed_with_no_extra_calls(provider_pipeline, server, tmp_path):
    server.configure(fail_next=[429] * 6, retry_after=0.05)
    pipeline = provider_pipeline()
    run_id, results = run_all(pipeline, tmp_path, rows(30), provider="openai", model="gpt-4o-mini")
    assert all(r["status"] == "succeeded" for r in results.values()) and len(results) == 30
    stats = server.stats()
    assert stats["requests"] == 36 and stats["by_status"] == {"200": 30, "429": 6}
    run = pipeline.run_row(run_id)
    assert (run["attempts"], run["rate_limited"]) == (36, 6)


def test_permanent_errors_fail_the_row_at_once_and_the_rest_go_on(provider_pipeline, server, tmp_path):
    server.configure(rules=[{"match": "row 3 ", "action": 400}, {"match": "row 7 ", "action": 404}])
    pipeline = provider_pipeline()
    run_id, results = run_all(pipeline, tmp_path, rows(10), provider="anthropic", model="claude-haiku-4-5")
    assert results["0003"]["status"] == "failed" and "HTTP 400" in results["0003"]["error"]
    assert results["0007"]["status"] == "failed" and "HTTP 404" in results["0007"]["error"]
    assert results["0003"]["attempts"] == results["0007"]["attempts"] == 1
    assert sum(r["status"] == "succeeded" for r in results.values()) == 8
    assert server.stats()["requests"] == 10
    run = pipeline.run_row(run_id)
    assert (run["rows_succeeded"], run["rows_failed"], run["status"]) == (8, 2, "completed")


def test_server_errors_and_timeouts_are_retried_and_an_unreadable_answer_is_billed_once(
    provider_pipeline, server, tmp_path
):
    """A 200 whose body cannot be read was likely billed: asking again would pay again, so the row fails at
    once and its estimated cost (prompt estimate + max tokens) is counted; 5xx and timeouts are retried."""
    server.configure(
        rules=[
            {"match": "row 1 ", "action": 503, "times": 2},
            {"match": "row 2 ", "action": "malformed", "times": 1},
            {"match": "row 3 ", "action": "hang", "times": 1},
        ],
        hang_seconds=1.5,
    )
    pipeline = provider_pipeline(request_timeout=0.5)
    run_id, results = run_all(pipeline, tmp_path, rows(5), provider="openai", model="gpt-4o-mini")
    assert [k for k, r in results.items() if r["status"] != "succeeded"] == ["0002"]
    assert results["0001"]["attempts"] == 3
    unreadable = results["0002"]
    assert unreadable["attempts"] == 1 and "body that is not JSON" in unreadable["error"]
    assert unreadable["output_tokens"] == 256 and unreadable["cost_nano"] > 0  # the worst case, once
    assert server.stats()["by_status"]["malformed"] == 1
    assert (results["0003"]["attempts"], results["0003"]["timeouts"]) == (2, 1)
    assert pipeline.run_row(run_id)["timeouts"] == 1


@pytest.mark.parametrize("param", ["stream=true", "n=3", 'model="gpt-4o"', "messages=[]"])
def test_params_the_pipeline_sets_are_refused_at_submit(provider_pipeline, tmp_path, param):
    pipeline = provider_pipeline()
    key, _, value = param.partition("=")
    with pytest.raises(ConfigError, match=f"param '{key}' cannot be set"):
        pipeline.submit(
            write(tmp_path / "d.csv", rows(2)),
            "Q: {{ text }}",
            provider="openai",
            model="gpt-4o-mini",
            params={key: json.loads(value)},
        )
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 0


def test_timeouts_have_their_own_smaller_retry_budget(provider_pipeline, server, tmp_path):
    server.configure(rules=[{"match": "row 0 ", "action": "hang"}], hang_seconds=1.5)
    pipeline = provider_pipeline(request_timeout=0.3, max_timeout_attempts=2, max_attempts=6)
    _, results = run_all(pipeline, tmp_path, rows(2), provider="openai", model="gpt-4o-mini")
    assert results["0000"]["status"] == "failed" and "timed out" in results["0000"]["error"]
    assert (results["0000"]["attempts"], results["0000"]["timeouts"]) == (2, 2)


def test_fallback_answers_when_the_primary_is_down(provider_pipeline, server, tmp_path):
    import socket

    with socket.socket() as probe:  # a port where nothing listens: the primary is down
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    pipeline = provider_pipeline(openai_base_url=f"http://127.0.0.1:{dead}/v1", max_attempts=2)
    _run_id, results = run_all(
        pipeline, tmp_path, rows(6), provider="openai", model="gpt-4o-mini", fallbacks=["anthropic:claude-haiku-4-5"]
    )
    assert {r["provider"] for r in results.values()} == {"anthropic"}
    assert all(r["status"] == "succeeded" and r["attempts"] == 3 for r in results.values())
    assert server.stats()["by_path"] == {"/v1/messages": 6}


def test_json_schema_answers_are_parsed_and_invalid_ones_fail_after_bounded_retries(
    provider_pipeline, server, tmp_path
):
    server.configure(
        answers=[
            {"match": "row 0 ", "content": '{"sentiment": "positive", "score": 0.9}'},
            {"match": "row 1 ", "content": '{"sentiment": "meh"}'},
            {"match": "row 2 ", "content": "not json at all"},
        ]
    )
    schema = {
        "type": "object",
        "required": ["sentiment"],
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
    }
    pipeline = provider_pipeline()
    _, results = run_all(
        pipeline, tmp_path, rows(3), provider="openai", model="gpt-4o-mini", json_schema=schema, use_cache=False
    )
    assert results["0000"]["status"] == "succeeded"
    assert results["0000"]["parsed"] == {"sentiment": "positive", "score": 0.9}
    assert results["0001"]["status"] == "failed" and "JSON schema" in results["0001"]["error"]
    assert results["0002"]["status"] == "failed" and "not JSON" in results["0002"]["error"]
    assert results["0001"]["attempts"] == results["0002"]["attempts"] == 2  # schema_attempts
    assert server.stats()["paid"][f"Say: {rows(3)[1]['text']}"] == 2


def test_shared_rate_limit_holds_across_two_worker_processes(provider_pipeline, server, tmp_path):
    """The server enforces 1200 RPM as a bucket of one second; the pipeline must never provoke a 429."""
    server.configure(rpm=1200, burst_seconds=1.0, latency=0.02)
    pipeline = provider_pipeline(worker_concurrency=32)
    report = pipeline.submit(
        write(tmp_path / "d.jsonl", rows(120)),
        TEMPLATE,
        id_column="id",
        chunk_size=20,
        provider="openai",
        model="gpt-4o-mini",
        rpm=1200,
    )
    workers = processes.start(["worker.py", "--burst", "--processes", "2"], pipeline.env())
    assert workers.wait(timeout=120) == 0
    pipeline.collect()
    stats = server.stats()
    assert stats["by_status"] == {"200": 120}, stats["by_status"]
    assert stats["max_per_second"] <= 20 + 20  # refill rate + one bucket of burst
    run = pipeline.run_row(report.run_id)
    assert (run["rows_succeeded"], run["rate_limited"]) == (120, 0)


def test_cancel_reaches_rows_waiting_out_a_long_retry_after(provider_pipeline, server, tmp_path):
    """The provider says "retry after 10 minutes": the rows sit in backoff and rate-limit waits. A cancel must
    end them all promptly (the burst worker exits), leaving them without a result for resume."""
    from pipeline.control import runs

    server.configure(fail_next=[429] * 50, retry_after=600)
    pipeline = provider_pipeline(worker_concurrency=8)
    run_id = pipeline.submit(
        write(tmp_path / "d.jsonl", rows(8)), TEMPLATE, id_column="id", provider="openai", model="gpt-4o-mini"
    ).run_id
    worker = processes.start(["worker.py", "--burst"], pipeline.env())
    try:
        processes.wait_for(lambda: server.stats()["by_status"].get("429", 0) >= 1, 30, "the first 429")
        runs.cancel(pipeline.redis, pipeline.settings, run_id)
        assert worker.wait(timeout=60) == 0  # not 600 s later
    finally:
        processes.kill_tree(worker)
    pipeline.collect()
    assert pipeline.results(run_id) == []
    assert pipeline.run_row(run_id)["status"] == "cancelled"


def test_retry_failed_sends_only_the_failed_rows(provider_pipeline, server, tmp_path):
    from pipeline.control import runs

    server.configure(rules=[{"match": "row 2 ", "action": 500}, {"match": "row 5 ", "action": 500}])
    pipeline = provider_pipeline(max_attempts=2)
    run_id, results = run_all(pipeline, tmp_path, rows(8), provider="openai", model="gpt-4o-mini")
    assert sorted(k for k, r in results.items() if r["status"] == "failed") == ["0002", "0005"]
    assert pipeline.run_row(run_id)["attempts"] == 6 + 2 * 2
    server.configure(rules=[])
    server.reset()
    assert runs.retry_failed(pipeline.redis, pipeline.settings, pipeline.engine, run_id) == 1
    with pytest.raises(ConfigError, match="still has 1 chunk job"):  # not twice at once: that would pay twice
        runs.retry_failed(pipeline.redis, pipeline.settings, pipeline.engine, run_id)
    pipeline.collect()  # the collector hears of the retry before any answer
    reopened = pipeline.run_row(run_id)
    assert (reopened["status"], reopened["rows_failed"], reopened["rows_succeeded"]) == ("running", 0, 6)
    pipeline.work()
    pipeline.collect()
    assert server.stats()["requests"] == 2
    run = pipeline.run_row(run_id)
    assert (run["rows_succeeded"], run["rows_failed"], run["status"]) == (8, 0, "completed")
    retried = {r["row_key"]: r for r in pipeline.results(run_id)}["0002"]
    assert (retried["attempts"], retried["calls"]) == (3, {"openai|gpt-4o-mini|500": 2, "openai|gpt-4o-mini|200": 1})
    assert run["attempts"] == 12  # every call made, the failed ones before the retry too


def test_a_prompt_repeated_within_a_chunk_is_paid_once(provider_pipeline, server, tmp_path):
    """Rows that repeat a prompt still in flight wait for its answer instead of paying for it again."""
    server.configure(latency=0.2)
    pipeline = provider_pipeline(worker_concurrency=16)
    data = [{"id": f"{i:04d}", "text": f"topic {i % 4}"} for i in range(24)]
    run_id, results = run_all(pipeline, tmp_path, data, provider="openai", model="gpt-4o-mini", chunk_size=24)
    assert server.stats()["paid"] == {f"Say: topic {t}": 1 for t in range(4)}
    assert all(
        r["status"] == "succeeded" and r["answer"] == f"ECHO: Say: {r['input']['text']}" for r in results.values()
    )
    assert sum(r["cached"] for r in results.values()) == 20
    run = pipeline.run_row(run_id)
    assert (run["rows_cached"], run["attempts"]) == (20, 4)


def test_a_prompt_asked_by_two_workers_at_once_is_paid_once(provider_pipeline, server, tmp_path):
    """Two chunks repeating the same prompts run on two worker processes at once: a cache miss claims the
    prompt, and the other worker waits for that answer instead of paying for it again."""
    server.configure(latency=0.3)
    pipeline = provider_pipeline(worker_concurrency=16)
    data = [{"id": f"{i:04d}", "text": f"topic {i % 4}"} for i in range(32)]
    run_id = pipeline.submit(
        write(tmp_path / "d.jsonl", data),
        TEMPLATE,
        id_column="id",
        chunk_size=8,
        provider="openai",
        model="gpt-4o-mini",
    ).run_id
    workers = processes.start(["worker.py", "--burst", "--processes", "2"], pipeline.env())
    assert workers.wait(timeout=120) == 0
    pipeline.collect()
    assert server.stats()["paid"] == {f"Say: topic {t}": 1 for t in range(4)}
    run = pipeline.run_row(run_id)
    assert (run["rows_succeeded"], run["rows_cached"], run["attempts"]) == (32, 28, 4)
    assert not list(pipeline.redis.scan_iter("cache:*:asking"))  # every claim went with its answer


def test_a_bug_or_a_stalled_call_costs_one_row_not_its_chunk(provider_pipeline, tmp_path):
    """A bug in answering one row (here: a provider object that raises) becomes that row's failed result; so does
    a call that never completes (a server trickling bytes defeats the SDK's read timeout, not the deadline)."""
    import asyncio

    from pipeline.calls.answer import RowAnswerer, Target
    from pipeline.calls.budget import RunBudget
    from pipeline.calls.ratelimit import SharedRateLimiter
    from pipeline.calls.retry import RetryPolicy
    from pipeline.providers.base import ProviderResponse
    from pipeline.queue import async_client
    from pipeline.records import ModelTarget, Row, RunConfig

    class Flaky:
        name = "flaky"

        async def complete(self, request):
            if "boom" in request.prompt:
                raise KeyError("unexpected")
            if "stall" in request.prompt:
                await asyncio.sleep(60)
            return ProviderResponse(text="ok", input_tokens=1, output_tokens=1, model=request.model)

        async def aclose(self):
            return None

    pipeline = provider_pipeline()
    config = RunConfig(
        run_id="rtest", dataset="d", dataset_hash="h", template="{{ text }}", provider="flaky", model="m"
    )

    async def answer_all():
        client = async_client(pipeline.settings, pipeline.redis)
        target = Target(ModelTarget("flaky", "m"), Flaky(), SharedRateLimiter(client, "flaky:m", rpm=None, tpm=None))
        policy = RetryPolicy(max_timeout_attempts=2, backoff_base=0.01, call_deadline=0.2)
        answerer = RowAnswerer(
            config,
            [target],
            policy=policy,
            prices=PriceTable.load(),
            budget=RunBudget(client, "rtest", None, hold_seconds=60),
            cache=None,
        )
        try:
            return await asyncio.gather(
                *(
                    answerer.answer(Row(str(i), i, {"text": t}))
                    for i, t in enumerate(["fine", "boom", "fine too", "stall"])
                )
            )
        finally:
            await client.aclose()

    results = asyncio.run(answer_all())
    assert [r.status for r in results] == ["succeeded", "failed", "succeeded", "failed"]
    assert results[1].error == "internal error: KeyError: 'unexpected'"
    assert (results[3].timeouts, results[3].attempts) == (2, 2)
    assert "no complete answer in 0.2 s" in results[3].error


def test_api_keys_never_reach_logs_results_payloads_or_metrics(provider_pipeline, server, tmp_path):
    from prometheus_client import generate_latest

    from pipeline.collect.collector import Collector
    from pipeline.collect.metrics import PipelineMetrics
    from pipeline.logs import setup_logging

    key = "sk-test-TOPSECRET-0123456789abcdef"
    log_file = tmp_path / "logs" / "pipeline.jsonl"
    server.configure(rules=[{"match": "row 1 ", "action": 401}])
    pipeline = provider_pipeline(openai_api_key=key, log_file=log_file, log_level="INFO")
    setup_logging(pipeline.settings, "test")
    report = pipeline.submit(
        write(tmp_path / "d.jsonl", rows(4)), TEMPLATE, id_column="id", provider="openai", model="gpt-4o-mini"
    )
    payloads = [pipeline.redis.dump(k) or b"" for k in pipeline.redis.scan_iter("*")]
    pipeline.work()
    stream = [repr(fields) for _, fields in pipeline.redis.xrange(pipeline.settings.result_stream)]
    metrics = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine)
    Collector(pipeline.settings, pipeline.redis, pipeline.engine, observers=[metrics.observe]).run(burst=True)
    results = pipeline.results(report.run_id)
    failed = [r for r in results if r["status"] == "failed"]
    assert len(failed) == 1 and "Incorrect API key provided: [REDACTED]" in failed[0]["error"]
    everything = "\n".join(
        [
            log_file.read_text(encoding="utf-8"),
            json.dumps(results, default=str),
            "\n".join(stream),
            b"\n".join(payloads).decode("utf-8", "replace"),
            generate_latest(metrics.registry).decode(),
            json.dumps(pipeline.run_row(report.run_id), default=str),
        ]
    )
    assert "sk-test-TOPSECRET" not in everything
    assert "TOPSECRET" not in everything


@pytest.mark.parametrize("header", [{"retry-after": "inf"}, {"retry-after-ms": "nan"}, {"retry-after-ms": "inf"}])
def test_a_retry_after_that_is_not_a_finite_number_is_ignored(header):
    from pipeline.providers.base import retry_after

    assert retry_after(header) is None  # ordinary backoff; `SET ... EX inf` broke the limiter's Lua


def test_an_enormous_retry_after_is_capped(provider_pipeline, server, tmp_path):
    """A bad proxy answers 429 with Retry-After 10^9 s: the row waits MAX_RETRY_AFTER, not until its job times
    out, and the shared limiter (paused by the 429) keeps working."""
    server.configure(fail_next=[429], retry_after=1e9)
    pipeline = provider_pipeline(max_retry_after=0.5)
    run_id, results = run_all(pipeline, tmp_path, rows(3), provider="openai", model="gpt-4o-mini", rpm=6000)
    assert all(r["status"] == "succeeded" for r in results.values())
    assert pipeline.run_row(run_id)["rate_limited"] == 1
