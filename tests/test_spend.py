"""What was billed reaches SQL, whatever happens to the row: an answer without usage, a budget stop or a cancel
after answers were billed, a call that timed out, a row answered twice. SQL spend equals the budget's Redis
spend to the nano-dollar, on SQLite and PostgreSQL, with the official SDKs against the fake provider."""
from __future__ import annotations

import asyncio
import threading

import redis.asyncio as aioredis
from rq.registry import StartedJobRegistry

from pipeline import handoff, runs
from pipeline.answer import estimate_tokens
from pipeline.budget import RunBudget, holds_key, spend_key
from pipeline.collector import Collector
from pipeline.metrics import PipelineMetrics
from pipeline.pricing import PriceTable
from pipeline.queue import SERIALIZER

from . import processes
from .datasets import write
from .fakeprovider import FakeProvider

TEMPLATE = "Q: {{ text }}"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}


def rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"r{i}", "text": f"plain question number {i}"} for i in range(n)]


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
        pipeline = make_pipeline(openai_api_key="sk-test", openai_base_url=f"{server.url}/v1",
                                 anthropic_api_key="sk-ant-test", anthropic_base_url=server.url,
                                 ratelimit_burst_seconds=100_000)
        metrics = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine)
        dataset = write(tmp_path / "d.csv", data)
        targets = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}
        reports = {provider: pipeline.submit(dataset, TEMPLATE, id_column="id", provider=provider, model=model,
                                             max_tokens=40, max_cost=1.0, use_cache=False, tpm=6)
                   for provider, model in targets.items()}
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
        counted = metrics.registry.get_sample_value("pipeline_estimated_usage_answers_total",
                                                    {"provider": provider, "model": model})
        assert counted == 2
    # The token bucket charged each call its prompt estimate and max output, and kept it (nothing refunded): its
    # theoretical arrival time is the first call's time plus that at the limit's rate (far ahead of the clock).
    rate = 6 * (1 - pipeline.settings.ratelimit_headroom) / 60
    charged = sum(estimate_tokens(f"Q: {r['text']}") + 40 for r in data)
    tat = float(pipeline.redis.get("ratelimit:openai:gpt-4o-mini:tokens"))
    assert charged - 0.01 <= (tat - started) * rate <= charged + elapsed * rate + 0.01
    print(f"no usage: SQL {sum(expected.values())} n$ = Redis {redis_spend(pipeline, run_id)} n$ per run "
          f"(before: 0 and 0); bucket kept {charged} tokens")


def _redis_time(pipeline) -> float:
    seconds, micros = pipeline.redis.time()
    return seconds + micros / 1e6
