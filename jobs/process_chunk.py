"""The RQ job: answer the rows of one chunk in this process's call window, and hand each result to the collector."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from rq import Retry, get_current_job
from rq.job import Job

from pipeline import handoff
from pipeline.calls.answer import RowAnswerer, Target
from pipeline.calls.budget import RunBudget
from pipeline.calls.cache import ResponseCache
from pipeline.calls.ratelimit import SharedRateLimiter
from pipeline.calls.retry import RetryPolicy
from pipeline.calls.window import CallWindow, Ticket, process_window
from pipeline.control import runstate
from pipeline.errors import BudgetExceeded, ConfigError, RowInterrupted, RunCancelled, RunNotFound
from pipeline.pricing import NANO
from pipeline.queue import chunk_generation, connect
from pipeline.records import SUCCEEDED, Result, Row, RunConfig
from pipeline.redaction import redact
from pipeline.settings import Settings, load_settings

log = logging.getLogger("pipeline.job")
CANCEL_CHECK_SECONDS = 0.25
HANDED_BACK = "handed back"  # the worker is shutting down: the chunk goes back with its unanswered rows
HAND_BACKS = 1000  # how often a chunk may be handed back by stopping workers before it fails


_settings: Settings | None = None
# The worker reserves a chunk's rows in the window before the job's thread starts (see pipeline.calls.workers).
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar("current_ticket", default=None)


def use_settings(settings: Settings) -> None:
    """The worker process hands its settings over at start, so each job needs no re-read."""
    global _settings
    _settings = settings


def worker_settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = load_settings()
    return _settings


def process_chunk(payload: dict[str, Any]) -> dict[str, Any] | Retry:
    settings = worker_settings()
    job = get_current_job()
    connection = job.connection if job is not None else connect(settings)
    config: RunConfig | RunNotFound
    try:
        config = runstate.load_config(connection, payload["run_id"])
    except RunNotFound as exc:
        config = exc
    if isinstance(config, RunConfig) and config.mode == "batch":  # no call window: the provider's batch API
        from jobs.batch_chunk import start_batch_chunk

        return start_batch_chunk(settings, connection, config, payload)
    window = process_window(settings, connection)
    ticket = current_ticket.get() or window.reserve(len(payload["rows"]))
    timeout = job.timeout if job is not None and job.timeout and job.timeout > 0 else None
    runner = ChunkRunner(settings, window, payload, ticket)
    try:
        summary = window.run(runner.run(config, timeout))
    finally:
        ticket.close()
    if runner.stopped == HANDED_BACK and summary["answered"] + summary["skipped_done"] < summary["rows"]:
        return Retry(max=HAND_BACKS, enqueue_at_front=True)  # RQ queues it again; answered rows are skipped then
    return summary


def chunk_failed(
    job: Job, connection: redis.Redis, exc_type: type | None, exc: BaseException | None, _traceback: Any
) -> None:
    """RQ's failure callback. After the last retry, rows still without a result get a failed one, so the run
    can end; ``retry-failed`` sends them again. (A worker killed on the last try skips callbacks: ``resume``.)
    """
    if job.retries_left:
        return
    payload = job.args[0]
    run_id = payload["run_id"]
    rows = [Row(key=r["key"], index=r["index"], values=r["values"]) for r in payload["rows"]]
    done = connection.hmget(handoff.done_key(run_id), [r.key for r in rows]) if rows else []
    reason = f"{exc_type.__name__}: {exc}" if exc_type is not None else "unknown error"
    error = redact(f"chunk {payload['chunk']} failed on every try ({reason})")[:2000]
    failures = [Result.failure(run_id, row, error) for row, status in zip(rows, done) if not handoff.is_done(status)]
    for failure in failures:
        failure.generation = chunk_generation(payload["chunk"])
    handoff.publish_results(connection, worker_settings().result_stream, failures)


@dataclass
class ChunkTally:
    """What a chunk's results add up to, for its one summary log line (provider calls log at DEBUG only)."""

    succeeded: int = 0
    failed: int = 0
    cached: int = 0
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int | None = 0  # None once a result was billed by a model without a price

    def add(self, result: Result) -> None:
        if result.status == SUCCEEDED:
            self.succeeded += 1
        else:
            self.failed += 1
        self.cached += result.cached
        self.attempts += result.attempts
        self.input_tokens += result.input_tokens
        self.output_tokens += result.output_tokens
        if self.cost_nano is not None:
            self.cost_nano = None if result.cost_nano is None else self.cost_nano + result.cost_nano

    @property
    def cost_usd(self) -> float | None:
        return None if self.cost_nano is None else self.cost_nano / NANO


def log_chunk_summary(summary: dict[str, Any]) -> None:
    """One INFO line per chunk: readable on the terminal, every figure a field of its own in the JSON log."""
    s = summary
    cost = "cost unknown" if s["cost_usd"] is None else f"${s['cost_usd']:.6f}"
    stopped = f", stopped: {s['stopped']}" if s["stopped"] else ""
    log.info(
        "run %s chunk %s: %d rows, %d succeeded, %d failed, %d cached, %d done before; %d attempts, "
        "%d tokens in, %d out, %s, %.2f s%s",
        s["run_id"],
        s["chunk"],
        s["rows"],
        s["succeeded"],
        s["failed"],
        s["cached"],
        s["skipped_done"],
        s["attempts"],
        s["input_tokens"],
        s["output_tokens"],
        cost,
        s["seconds"],
        stopped,
        extra=s,
    )


class ChunkRunner:
    """One chunk's rows on the window's loop; its rows share the window's places with every other chunk's."""

    def __init__(self, settings: Settings, window: CallWindow, payload: dict[str, Any], ticket: Ticket) -> None:
        self.settings = settings
        self.window = window
        self.client: aioredis.Redis = window.client
        self.ticket = ticket
        self.run_id: str = payload["run_id"]
        self.chunk: str = payload["chunk"]
        self.rows = [Row(key=r["key"], index=r["index"], values=r["values"]) for r in payload["rows"]]
        self.generation = chunk_generation(self.chunk)
        self.stopped: str | None = None
        self.tally = ChunkTally()
        self._cancel_checked = float("-inf")

    async def run(self, config: RunConfig | Exception, timeout: float | None) -> dict[str, Any]:
        started = time.monotonic()
        todo = await self._rows_without_result()
        self.ticket.started(len(self.rows) - len(todo))
        try:
            if isinstance(config, Exception):
                raise config
            answerer = self._answerer(config)
        except (ConfigError, RunNotFound) as exc:  # retrying the chunk cannot help: its rows fail now
            answered = await self._fail_rows(todo, f"cannot start the chunk: {exc}")
        else:
            async with asyncio.timeout(timeout):  # RQ's job timeout, kept by the loop (no signal in a thread)
                answered = await self._answer_all(answerer, todo)
        tally = asdict(self.tally)
        del tally["cost_nano"]
        summary = {
            "run_id": self.run_id,
            "chunk": self.chunk,
            "rows": len(self.rows),
            "skipped_done": len(self.rows) - len(todo),
            "answered": answered,
            **tally,
            "cost_usd": self.tally.cost_usd,
            "seconds": round(time.monotonic() - started, 3),
            "stopped": self.stopped,
        }
        log_chunk_summary(summary)
        return summary

    async def _fail_rows(self, rows: list[Row], error: str) -> int:
        log.error("chunk %s of run %s: %s", self.chunk, self.run_id, error, extra={"run_id": self.run_id})
        results = [Result.failure(self.run_id, row, error) for row in rows]
        for result in results:
            result.generation = self.generation
            self.tally.add(result)
        await handoff.publish_results_async(self.client, self.settings.result_stream, results)
        return len(rows)

    async def _rows_without_result(self) -> list[Row]:
        """Rows whose result an earlier attempt of this chunk already handed over are not paid for again."""
        if not self.rows:
            return []
        done = await self.client.hmget(handoff.done_key(self.run_id), [r.key for r in self.rows])
        return [row for row, status in zip(self.rows, done) if not handoff.is_done(status)]

    def _answerer(self, config: RunConfig) -> RowAnswerer:
        s = self.settings
        prices = self.window.prices.with_price(config.model, config.price_in, config.price_out)
        unpriced = prices.unpriced([spec.model for spec in config.targets])
        if unpriced and config.max_cost is not None:  # submit checked with its own PRICE_FILE, not this one
            raise ConfigError(
                f"no price for {', '.join(unpriced)} on this worker, and the run has a --max-cost; "
                "add it to the worker's PRICE_FILE"
            )
        targets = []
        for spec in config.targets:
            limiter = SharedRateLimiter(
                self.client,
                f"{spec.provider}:{spec.model}",
                rpm=config.rpm or s.default_rpm,
                tpm=config.tpm or s.default_tpm,
                burst_seconds=s.ratelimit_burst_seconds,
                headroom=s.ratelimit_headroom,
                batcher=self.window.reads,
            )
            targets.append(Target(spec, self.window.provider(spec.provider), limiter))
        policy = RetryPolicy(
            s.max_attempts,
            s.max_timeout_attempts,
            s.backoff_base,
            s.backoff_max,
            call_deadline=s.request_timeout + 5,
            max_retry_after=s.max_retry_after,
        )
        return RowAnswerer(
            config,
            targets,
            policy=policy,
            prices=prices,
            budget=RunBudget(
                self.client,
                config.run_id,
                config.max_cost,
                hold_seconds=policy.hold_seconds(),
                reads=self.window.reads,
                writes=self.window.writes,
            ),
            cache=ResponseCache(
                self.client,
                s.cache_ttl,
                claimant=f"{self.run_id}:{self.chunk}",
                reads=self.window.reads,
                writes=self.window.writes,
            ),
            should_stop=self._should_stop,
            in_flight=self.window.prompts_in_flight,
        )

    async def _answer_all(self, answerer: RowAnswerer, rows: list[Row]) -> int:
        answered = 0

        async def one(row: Row) -> None:
            nonlocal answered
            async with self.window.place(self.ticket):
                if self.stopped or await self._should_stop():
                    return
                try:
                    result = await answerer.answer(row)
                except BudgetExceeded as exc:
                    await self._hand_over_billed(exc)
                    await self._stop(runstate.BUDGET_EXHAUSTED)
                    return
                except RunCancelled as exc:  # cancelled while this row waited (rate limit, backoff): left for resume
                    await self._hand_over_billed(exc)
                    return
                await self._hand_over(result)
                answered += 1
                self.tally.add(result)

        async with asyncio.TaskGroup() as group:  # a row that raises (Redis lost) stops its chunk's other rows
            for row in rows:
                group.create_task(one(row))
        return answered

    async def _hand_over(self, result: Result) -> None:
        result.generation = self.generation
        result.finished_at += self.settings.clock_offset
        await self.window.hand_over.put(result)

    async def _hand_over_billed(self, exc: RowInterrupted) -> None:
        """A row cut short after answers were billed for it: its ``stopped`` result carries that spend to SQL
        (``resume`` asks the row again, and its new result adds to it)."""
        if isinstance(exc.billed, Result):
            await self._hand_over(exc.billed)

    async def _should_stop(self) -> bool:
        """Looks at the cancel flag at most every CANCEL_CHECK_SECONDS, not once per row."""
        if self.stopped is None and self.window.draining:
            self.stopped = HANDED_BACK
        now = time.monotonic()
        if self.stopped is None and now - self._cancel_checked >= CANCEL_CHECK_SECONDS:
            self._cancel_checked = now
            if await self.client.exists(runstate.cancelled_key(self.run_id)):
                self.stopped = runstate.CANCELLED
        return self.stopped is not None

    async def _stop(self, status: str) -> None:
        if self.stopped is None:
            self.stopped = status
            await handoff.publish_event_async(
                self.client, self.settings.result_stream, handoff.STATUS, {"run_id": self.run_id, "status": status}
            )
