"""The RQ job: answer the rows of one chunk, many calls in flight, and hand each result to the collector."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis
import redis.asyncio as aioredis
from rq import get_current_job
from rq.job import Job

from pipeline import handoff, runstate
from pipeline.answer import RowAnswerer, Target
from pipeline.budget import RunBudget
from pipeline.cache import ResponseCache
from pipeline.errors import BudgetExceeded, ConfigError, RunCancelled, RunNotFound
from pipeline.pricing import PriceTable
from pipeline.providers import build_provider
from pipeline.queue import async_client, connect
from pipeline.ratelimit import SharedRateLimiter
from pipeline.records import Result, Row, RunConfig
from pipeline.redaction import redact
from pipeline.retry import RetryPolicy
from pipeline.settings import Settings, load_settings

log = logging.getLogger("pipeline.job")
CANCEL_CHECK_SECONDS = 0.25


_settings: Settings | None = None


def use_settings(settings: Settings) -> None:
    """The worker process hands its settings over before it forks, so each job needs no re-read."""
    global _settings
    _settings = settings


def worker_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def process_chunk(payload: dict[str, Any]) -> dict[str, Any]:
    settings = worker_settings()
    job = get_current_job()
    connection = job.connection if job is not None else connect(settings)
    return asyncio.run(ChunkRunner(settings, connection, payload).run())


def chunk_failed(job: Job, connection: redis.Redis, exc_type: type | None, exc: BaseException | None,
                 _traceback: Any) -> None:
    """RQ's failure callback. After the last retry, rows still without a result get a failed one, so the run
    can end; ``retry-failed`` sends them again. (A work horse killed on the last try skips callbacks: ``resume``.)
    """
    if job.retries_left:
        return
    payload = job.args[0]
    run_id = payload["run_id"]
    rows = [Row(key=r["key"], index=r["index"], values=r["values"]) for r in payload["rows"]]
    done = connection.hmget(handoff.done_key(run_id), [r.key for r in rows]) if rows else []
    reason = f"{exc_type.__name__}: {exc}" if exc_type is not None else "unknown error"
    error = redact(f"chunk {payload['chunk']} failed on every try ({reason})")[:2000]
    handoff.publish_results(connection, worker_settings().result_stream,
                            [Result.failure(run_id, row, error) for row, status in zip(rows, done) if status is None])


class ChunkRunner:
    def __init__(self, settings: Settings, connection: redis.Redis, payload: dict[str, Any]) -> None:
        self.settings = settings
        self.connection = connection
        self.run_id: str = payload["run_id"]
        self.chunk: str = payload["chunk"]
        self.rows = [Row(key=r["key"], index=r["index"], values=r["values"]) for r in payload["rows"]]
        self.stopped: str | None = None
        self._cancel_checked = float("-inf")

    async def run(self) -> dict[str, Any]:
        client = async_client(self.settings, self.connection)
        targets: list[Target] = []
        try:
            todo = await self._rows_without_result(client)
            try:
                config = runstate.load_config(self.connection, self.run_id)
                answerer = self._answerer(config, client, targets)
            except (ConfigError, RunNotFound) as exc:  # retrying the chunk cannot help: its rows fail now
                answered = self._fail_rows(todo, f"cannot start the chunk: {exc}")
            else:
                answered = await self._answer_all(client, answerer, todo)
        finally:
            for target in targets:
                await target.provider.aclose()
            await client.aclose()
        summary = {"run_id": self.run_id, "chunk": self.chunk, "rows": len(self.rows),
                   "skipped_done": len(self.rows) - len(todo), "answered": answered, "stopped": self.stopped}
        log.info("chunk finished", extra={"run_id": self.run_id, "summary": summary})
        return summary

    def _fail_rows(self, rows: list[Row], error: str) -> int:
        log.error("chunk %s of run %s: %s", self.chunk, self.run_id, error, extra={"run_id": self.run_id})
        handoff.publish_results(self.connection, self.settings.result_stream,
                                [Result.failure(self.run_id, row, error) for row in rows])
        return len(rows)

    async def _rows_without_result(self, client: aioredis.Redis) -> list[Row]:
        """Rows whose result an earlier attempt of this chunk already handed over are not paid for again."""
        if not self.rows:
            return []
        done = await client.hmget(handoff.done_key(self.run_id), [r.key for r in self.rows])
        return [row for row, status in zip(self.rows, done) if status is None]

    def _answerer(self, config: RunConfig, client: aioredis.Redis, targets: list[Target]) -> RowAnswerer:
        """The row answerer; ``targets`` receives each provider as it is built, so the caller can close them."""
        s = self.settings
        prices = PriceTable.load(s.price_file).with_price(config.model, config.price_in, config.price_out)
        unpriced = prices.unpriced([spec.model for spec in config.targets])
        if unpriced and config.max_cost is not None:  # submit checked with its own PRICE_FILE, not this one
            raise ConfigError(f"no price for {', '.join(unpriced)} on this worker, and the run has a --max-cost; "
                              "add it to the worker's PRICE_FILE")
        for spec in config.targets:
            limiter = SharedRateLimiter(client, f"{spec.provider}:{spec.model}",
                                        rpm=config.rpm or s.default_rpm, tpm=config.tpm or s.default_tpm,
                                        burst_seconds=s.ratelimit_burst_seconds)
            targets.append(Target(spec, build_provider(spec.provider, s), limiter))
        policy = RetryPolicy(s.max_attempts, s.max_timeout_attempts, s.backoff_base, s.backoff_max,
                             call_deadline=s.request_timeout + 5)
        return RowAnswerer(config, targets, policy=policy, prices=prices,
                           budget=RunBudget(client, config.run_id, config.max_cost),
                           cache=ResponseCache(client, s.cache_ttl, claimant=f"{self.run_id}:{self.chunk}"),
                           should_stop=lambda: self._should_stop(client))

    async def _answer_all(self, client: aioredis.Redis, answerer: RowAnswerer, rows: list[Row]) -> int:
        slots = asyncio.Semaphore(self.settings.worker_concurrency)
        answered = 0

        async def one(row: Row) -> None:
            nonlocal answered
            async with slots:
                if self.stopped or await self._should_stop(client):
                    return
                try:
                    result = await answerer.answer(row)
                except BudgetExceeded:
                    await self._stop(client, runstate.BUDGET_EXHAUSTED)
                    return
                except RunCancelled:  # cancelled while this row waited (rate limit, backoff): left for resume
                    return
                await handoff.publish_result(client, self.settings.result_stream, result)
                answered += 1

        await asyncio.gather(*(one(row) for row in rows))
        return answered

    async def _should_stop(self, client: aioredis.Redis) -> bool:
        """Looks at the cancel flag at most every CANCEL_CHECK_SECONDS, not once per row."""
        now = time.monotonic()
        if self.stopped is None and now - self._cancel_checked >= CANCEL_CHECK_SECONDS:
            self._cancel_checked = now
            if await client.exists(runstate.cancelled_key(self.run_id)):
                self.stopped = runstate.CANCELLED
        return self.stopped is not None

    async def _stop(self, client: aioredis.Redis, status: str) -> None:
        if self.stopped is None:
            self.stopped = status
            await handoff.publish_event_async(client, self.settings.result_stream, handoff.STATUS,
                                              {"run_id": self.run_id, "status": status})
