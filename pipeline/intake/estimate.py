"""What a run would cost before it spends: ``submit --dry-run``.

Each row is rendered and priced the way a worker prices its budget hold: the prompt estimate of
``answer.estimate_tokens`` (system prompt included) and the most output tokens the call may bill, at the primary
model's price. Rows the response cache already answers, and rows repeating a prompt an earlier row asks (a
worker waits for that call, or finds its answer cached), cost nothing. Fallbacks are left out: they answer only
rows the primary failed. The time is what the run's RPM/TPM (or DEFAULT_RPM/TPM) allow, less RATELIMIT_HEADROOM;
without a limit it depends on the provider's latency and WORKER_CONCURRENCY, and is not estimated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from pipeline.calls.answer import estimate_tokens, output_limit
from pipeline.calls.cache import cache_key
from pipeline.intake.templates import PromptTemplate
from pipeline.pricing import NANO, PriceTable
from pipeline.providers import ProviderRequest, build_provider
from pipeline.records import Row, RunConfig
from pipeline.settings import Settings


@dataclass
class Estimate:
    run_id: str
    model: str
    rows: int
    rows_cached: int  # answered by the cache, or by an earlier row's call for the same prompt
    input_tokens: int  # estimated, of the rows that need a call
    output_tokens: int  # worst case: every call bills its output limit
    cost_usd: float | None  # None: the model has no price
    seconds: float | None  # None: no RPM/TPM limit to estimate from
    rpm: int | None
    tpm: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(connection: redis.Redis, settings: Settings, config: RunConfig) -> Estimate:
    """Read the dataset once more and price every row; nothing is written anywhere."""
    from pipeline.intake.datasets import (
        iter_chunks,  # pandas and pyarrow: imported only by the commands that read a file
    )

    counts = _count(
        connection,
        config,
        _server(settings, config.provider),
        iter_chunks(Path(config.dataset), config.chunk_size, config.id_column),
    )
    rows, cached, input_tokens, output_tokens = counts
    prices = PriceTable.load(settings.price_file).with_price(config.model, config.price_in, config.price_out)
    price = prices.batch_price(config.provider, config.model) if config.mode == "batch" else prices.price(config.model)
    cost = None if price is None else price.cost_nano(input_tokens, output_tokens) / NANO
    rpm, tpm = config.rpm or settings.default_rpm, config.tpm or settings.default_tpm
    seconds = _seconds(rows - cached, input_tokens + output_tokens, rpm, tpm, settings.ratelimit_headroom)
    return Estimate(config.run_id, config.model, rows, cached, input_tokens, output_tokens, cost, seconds, rpm, tpm)


def _server(settings: Settings, provider: str) -> str | None:
    """The base URL the provider's client posts to: part of the cache key (None for the offline fake)."""
    return getattr(build_provider(provider, settings), "base_url", None)


def _count(
    connection: redis.Redis, config: RunConfig, server: str | None, chunks: Iterable[list[Row]]
) -> tuple[int, int, int, int]:
    template = PromptTemplate(config.template)
    seen: set[str] = set()
    rows = cached = input_tokens = output_tokens = 0
    for chunk in chunks:
        requests = [
            ProviderRequest(
                prompt=template.render(row.values),
                model=config.model,
                max_tokens=config.max_tokens,
                system=config.system_prompt,
                temperature=config.temperature,
                params=config.params,
                json_schema=config.json_schema,
            )
            for row in chunk
        ]
        keys = [cache_key(config.provider, request, server) for request in requests]
        in_cache = _in_cache(connection, keys) if config.use_cache else [False] * len(keys)
        for request, key, hit in zip(requests, keys, in_cache):
            rows += 1
            if config.use_cache and (hit or key in seen):
                cached += 1
                continue
            seen.add(key)
            input_tokens += estimate_tokens((request.system or "") + request.prompt)
            output_tokens += output_limit(request)
    return rows, cached, input_tokens, output_tokens


def _in_cache(connection: redis.Redis, keys: list[str]) -> list[bool]:
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.exists(key)
        return [bool(n) for n in pipe.execute()]


def _seconds(calls: int, tokens: int, rpm: int | None, tpm: int | None, headroom: float) -> float | None:
    """The slower of the two limits decides; the limiter keeps ``headroom`` of each unused."""
    if rpm is None and tpm is None:
        return None
    by_requests = calls * 60 / (rpm * (1 - headroom)) if rpm else 0.0
    by_tokens = tokens * 60 / (tpm * (1 - headroom)) if tpm else 0.0
    return round(max(by_requests, by_tokens), 1)
