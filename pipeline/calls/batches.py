"""Batch mode: a chunk's rows go to the provider's batch API as one batch, and its answers come back, hours later,
through the same hand-over as online answers.

No worker waits for a batch. The chunk job answers what the response cache knows at once, records the batch's
*intent* (a slot record in Redis, ``pipeline.calls.batchstate``), creates the batch and records its id; from then on a
scheduled poll job looks at it with backoff (``advance``). When it ends, every answer is handed to the collector
as a Result carrying its ``batch_id``, costed at the batch price. Items that errored or expired go into a next
round (a new slot with only them), a bounded number of times; succeeded ones are never sent again.

Exactly once: a slot makes at most one live batch. Before creating, a job takes a lease on it in the record
(``creating``), so two jobs never create at once; a job that finds a lapsed lease of the same attempt (a worker
killed after the create call, a create whose reply was lost, an RQ retry) first looks for the batch at the
provider (``BatchAPI.find``: OpenAI by the chunk id in its metadata, Anthropic by time,
size and custom_id prefix) and adopts it instead of creating another.

The intent, the batch id and the end are also published to the collector (``handoff.BATCH``), which keeps them in
SQL (``store.batches``). A chunk job that finds no slot record in Redis reads SQL first: a batch recorded there as
open whose record Redis lost is rebuilt under its own slot and followed (or looked for, if only its intent was
recorded), never made again. Item ids are derived from the request's content, so the rebuilt items map back to
the batch's answers.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import timedelta
from typing import Any

import redis
from rq.job import Job, JobStatus
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import handoff
from pipeline.calls import batchstate as bs
from pipeline.calls.answer import estimate_tokens, output_limit, provider_request
from pipeline.calls.budget import reserve_batch, settle_batch
from pipeline.calls.cache import cache_key
from pipeline.collect import store
from pipeline.control.runstate import BUDGET_EXHAUSTED, cancelled_key
from pipeline.errors import BudgetExceeded, PermanentError, ProviderError, RateLimited, TemplateError
from pipeline.intake.templates import PromptTemplate
from pipeline.pricing import Price, PriceTable
from pipeline.providers.base import ProviderRequest, ProviderResponse
from pipeline.providers.batches import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    LIMITS,
    OPEN_STATES,
    UPLOAD_RETRIES,
    UPLOAD_TIMEOUT_FACTOR,
    BatchAPI,
    BatchItem,
    ItemOutcome,
    build_batch_api,
)
from pipeline.queue import BATCH_POLL_FUNCTION, chunk_queue
from pipeline.records import SUCCEEDED, Result, Row, RunConfig, stable_hash
from pipeline.redaction import redact
from pipeline.settings import Settings

log = logging.getLogger("pipeline.batches")
HOLD_SECONDS = 26 * 3600  # a batch's budget hold outlives its 24 h window
PUBLISH_AT_ONCE = 500
ACTIVE_JOB_STATES = {JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.STARTED, JobStatus.DEFERRED}
ENDED_STATES = {COMPLETED, EXPIRED, CANCELLED, FAILED, "skipped"}


def item_id(tag: str, key: str) -> str:
    """A batch item's custom_id: the slot's tag and its request's cache key, so that the same rows give the same
    ids when a slot is rebuilt (within Anthropic's 64 characters of [A-Za-z0-9_-])."""
    return f"{tag}-{stable_hash(key)[:20]}"


def chunk_number(label: str) -> str:
    """``c000007`` of ``c000007`` and of ``g2-c000007`` (the label resume gives the chunk's rows later)."""
    return label.rsplit("-", 1)[-1]


def create_lease_seconds(settings: Settings) -> float:
    """How long a job holds the right to create a slot's batch: longer than its calls can last (an upload with
    its retries, then the create), each bounded by the client's timeout."""
    return ((UPLOAD_RETRIES + 2) * UPLOAD_TIMEOUT_FACTOR + 1) * settings.request_timeout


def poll_job_id(slot: str) -> str:
    return "batchpoll-" + slot.replace(":", "-")


class BatchRunner:
    """One run's batch work on a worker: start a chunk, advance a slot."""

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        config: RunConfig,
        api: BatchAPI | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine  # read-only: the batches SQL recorded, for a chunk whose record Redis lost
        self.connection = connection
        self.config = config
        self.api = api or build_batch_api(config.provider, settings)
        prices = PriceTable.load(settings.price_file).with_price(config.model, config.price_in, config.price_out)
        self.price: Price | None = prices.batch_price(config.provider, config.model)
        self.target = f"{config.provider}:{config.model}"

    # --- the chunk job ---------------------------------------------------------------------------------------
    def start_chunk(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Hand over what the cache answers, record the rest as the chunk's first batch and advance it."""
        chunk = payload["chunk"]
        slot = bs.slot_id(self.config.run_id, chunk, 1)
        summary = {"run_id": self.config.run_id, "chunk": chunk, "rows": len(payload["rows"]), "mode": "batch"}
        if self.connection.exists(cancelled_key(self.config.run_id)):
            return {**summary, "stopped": "cancelled"}
        if bs.load(self.connection, slot) is None:
            rows = [Row(key=r["key"], index=r["index"], values=r["values"]) for r in payload["rows"]]
            recorded = self._lost_open_batch(chunk)
            if recorded is not None:
                slot = bs.slot_id(self.config.run_id, recorded["chunk"], recorded["round"])
            items, ready = self._prepare(slot, self._rows_without_result(rows))
            self._publish(ready)
            summary.update(answered_now=len(ready), batched=sum(len(i.rows) for i in items))
            if not items:
                return summary
            record = bs.SlotRecord(
                slot=slot,
                run_id=self.config.run_id,
                chunk=recorded["chunk"] if recorded else chunk,
                round=recorded["round"] if recorded else 1,
                items=items,
                intent_at=recorded["created_at"] if recorded else bs.now(),
            )
            if bs.save_intent(self.connection, record):
                if recorded is None:
                    self._record_in_sql(record)
                else:
                    self._adopt(record, recorded["batch_id"])
        self.follow(slot)
        return summary

    def _lost_open_batch(self, chunk: str) -> dict[str, Any] | None:
        """The chunk's batch that SQL records as not ended and whose slot record Redis no longer has (Redis lost
        the run's state): it is the chunk's batch, not a new one. None when SQL has none (or cannot say)."""
        if self.engine is None:
            return None
        try:
            with self.engine.connect() as conn:
                recorded = store.chunk_batches(conn, self.config.run_id, chunk_number(chunk))
        except SQLAlchemyError as exc:
            log.warning(
                "%s: cannot read its recorded batches: %s",
                chunk,
                type(exc).__name__,
                extra={"run_id": self.config.run_id},
            )
            return None
        for row in reversed(recorded):
            slot = bs.slot_id(self.config.run_id, row["chunk"], row["round"])
            if row["state"] not in ENDED_STATES and bs.load(self.connection, slot) is None:
                return row
        return None

    def _adopt(self, record: bs.SlotRecord, batch_id: str | None) -> None:
        """Follow the batch SQL recorded; with only its intent recorded, look for it at the provider first."""
        if batch_id:
            log.info(
                "%s: adopting its batch %s recorded in SQL", record.slot, batch_id, extra={"run_id": record.run_id}
            )
            bs.record_batch(self.connection, record, batch_id, record.intent_at, None, "created")
        else:
            bs.end_create_lease(self.connection, record)  # its create may have happened: the next look searches

    def _record_in_sql(self, record: bs.SlotRecord, state: str | None = None) -> None:
        """Hand the slot's intent, batch id or end to the collector, which keeps it in SQL's batches table."""
        handoff.publish_event(
            self.connection,
            self.settings.result_stream,
            handoff.BATCH,
            {
                "run_id": record.run_id,
                "chunk": record.chunk,
                "round": record.round,
                "batch_id": record.batch_id,
                "provider": self.config.provider,
                "state": state or record.state,
                "at": record.intent_at,
            },
        )

    def follow(self, slot: str) -> None:
        """Advance the slot now; if it is not done, a poll job looks again later."""
        wait = self.advance(slot)
        if wait is not None:
            schedule_poll(self.connection, self.settings, self.config.run_id, slot, wait)

    def _rows_without_result(self, rows: list[Row]) -> list[Row]:
        if not rows:
            return []
        done = self.connection.hmget(handoff.done_key(self.config.run_id), [r.key for r in rows])
        return [row for row, status in zip(rows, done) if status is None]

    def _prepare(self, slot: str, rows: list[Row]) -> tuple[list[bs.Item], list[Result]]:
        """The batch's items (rows with one prompt share one), and the results known now: cache hits and rows
        whose prompt cannot be rendered."""
        template = PromptTemplate(self.config.template)
        ready: list[Result] = []
        by_key: dict[str, bs.Item] = {}
        base_url = self.api.base_url
        tag = stable_hash(slot)[:12]
        for row in rows:
            try:
                prompt = template.render(row.values)
                if not prompt.strip():
                    raise TemplateError("the template rendered an empty prompt")
            except TemplateError as exc:
                ready.append(Result.failure(self.config.run_id, row, f"row {row.key}: {exc}"))
                continue
            request = self._request(prompt)
            key = cache_key(self.config.provider, request, base_url)
            item = by_key.get(key)
            if item is None:
                item = by_key[key] = bs.Item(
                    custom_id=item_id(tag, key),
                    rows=[],
                    prompt=prompt,
                    prompt_hash=stable_hash(prompt)[:16],
                    cache_key=key,
                    **self._worst_case(request),
                )
            item.rows.append({"key": row.key, "index": row.index, "values": row.values})
        items = list(by_key.values())
        if self.config.use_cache and items:
            cached = self.connection.mget([i.cache_key for i in items])
            for item, raw in zip(items, cached):
                if raw is not None:
                    data = json.loads(raw)
                    answer = ProviderResponse(data["text"], data["input_tokens"], data["output_tokens"], data["model"])
                    ready += self._answered(item, answer, None, cached=True)
            items = [i for i, raw in zip(items, cached) if raw is None]
        return items, ready

    def _request(self, prompt: str) -> ProviderRequest:
        return provider_request(self.config, prompt, self.config.model)

    def _worst_case(self, request: ProviderRequest) -> dict[str, int]:
        prompt_tokens, output_cap = estimate_tokens((request.system or "") + request.prompt), output_limit(request)
        worst = self.price.cost_nano(prompt_tokens, output_cap) if self.price else 0
        return {"worst_case_nano": worst, "tokens": prompt_tokens + output_cap}

    # --- a slot's life ---------------------------------------------------------------------------------------
    def advance(self, slot: str) -> float | None:
        """Move the slot on: create its batch, look at it, collect it. Returns the seconds until it should be
        looked at again, or None once it is done."""
        record = bs.load(self.connection, slot)
        if record is None or record.done:
            return None
        cancelled = bool(self.connection.exists(cancelled_key(self.config.run_id)))
        if record.batch_id is None:
            if cancelled:
                self._end_unmade(record, "skipped")
                return None
            wait = self._create(record)
            if wait is not None or record.done:
                return wait
        batch_id = record.batch_id
        if batch_id is None:  # not made yet: look again later
            return self._backoff(record)
        try:
            info = self.api.retrieve(batch_id)
        except ProviderError as exc:
            log.warning("batch %s of %s: %s", record.batch_id, slot, exc, extra={"run_id": record.run_id})
            return self._backoff(record)
        if info.state != record.state or info.expires_at != record.expires_at:
            bs.set_fields(self.connection, slot, state=info.state, expires_at=info.expires_at)
            if info.expires_at:
                self.connection.zadd(bs.EXPIRY, {slot: info.expires_at})
        if info.refused:
            log.warning(
                "batch %s of %s refused, waiting %s s: %s",
                info.id,
                slot,
                self.settings.batch_wait_seconds,
                info.refused,
                extra={"run_id": record.run_id},
            )
            bs.release_tokens(self.connection, slot, self.target)
            bs.forget_batch(self.connection, record)
            return self.settings.batch_wait_seconds
        if info.state in OPEN_STATES:
            if cancelled and "cancel_sent" not in record.extra:
                self._cancel(record, batch_id)
            return self._backoff(record)
        try:
            outcomes = {o.custom_id: o for o in self.api.outcomes(batch_id)}
        except ProviderError as exc:
            log.warning("results of batch %s: %s", record.batch_id, exc, extra={"run_id": record.run_id})
            return self._backoff(record)
        self._collect(record, info.state, outcomes, cancelled)
        return None

    def _backoff(self, record: bs.SlotRecord) -> float:
        polls = int(self.connection.hincrby(bs.record_key(record.slot), "polls", 1))
        return min(self.settings.batch_poll_seconds * 2 ** (polls - 1), self.settings.batch_poll_max_seconds)

    def _cancel(self, record: bs.SlotRecord, batch_id: str) -> None:
        try:
            self.api.cancel(batch_id)
        except ProviderError as exc:
            log.warning("cancelling batch %s: %s", record.batch_id, exc, extra={"run_id": record.run_id})
            return
        bs.set_fields(self.connection, record.slot, cancel_sent="1")

    def _create(self, record: bs.SlotRecord) -> float | None:
        """Find the slot's batch if an earlier attempt may have made it, else create it. None once recorded."""
        claim = bs.claim_create(self.connection, record, create_lease_seconds(self.settings))
        if claim == bs.BUSY:  # another job is creating it right now: look again later
            return self.settings.batch_poll_seconds
        if claim == bs.MAY_EXIST:
            found = self._find(record)
            if found is not None:
                if not found:
                    bs.end_create_lease(self.connection, record)
                return None if found else self.settings.batch_poll_seconds
        limit = self.settings.batch_enqueued_tokens.get(self.config.model)
        if not bs.enqueue_tokens(self.connection, record.slot, self.target, sum(i.tokens for i in record.items), limit):
            log.info("%s: its model's open batches are at the enqueued-token limit (%s); waiting", record.slot, limit)
            bs.drop_create_claim(self.connection, record)
            return self.settings.batch_wait_seconds
        if not self._hold_budget(record):
            bs.drop_create_claim(self.connection, record)
            return None if record.done else self.settings.batch_wait_seconds
        items = [BatchItem(i.custom_id, self._request(i.prompt)) for i in record.items]
        too_big = self._over_limits(items)
        if too_big:
            bs.release_tokens(self.connection, record.slot, self.target)
            self._fail_slot(record, too_big)
            return None
        try:
            batch_id = self.api.create(record.provider_chunk_id, items)
        except RateLimited as exc:  # the enqueued-token limit (Anthropic), or the batch API's own rate limit
            log.warning(
                "%s: creating the batch was refused, waiting: %s", record.slot, exc, extra={"run_id": record.run_id}
            )
            bs.drop_create_claim(self.connection, record)
            bs.release_tokens(self.connection, record.slot, self.target)
            return max(self.settings.batch_wait_seconds, exc.retry_after or 0)
        except PermanentError as exc:
            bs.drop_create_claim(self.connection, record)
            self._fail_slot(record, f"creating the batch failed: {exc}")
            return None
        except ProviderError as exc:  # the batch may exist (reply lost): the next look finds it first
            log.warning("%s: creating the batch: %s", record.slot, exc, extra={"run_id": record.run_id})
            bs.end_create_lease(self.connection, record)
            return self.settings.batch_poll_seconds
        bs.record_batch(self.connection, record, batch_id, bs.now(), None, "created")
        self._record_in_sql(record)
        return None

    def _over_limits(self, items: list[BatchItem]) -> str | None:
        """Why the provider would refuse this batch for its size, if it would (checked before paying for an upload)."""
        most_requests, most_bytes = LIMITS[self.config.provider]
        size = sum(len(json.dumps(vars(i.request), default=str).encode("utf-8")) + 200 for i in items)
        if len(items) > most_requests or size > most_bytes:
            return (
                f"a batch of {len(items)} requests and about {size / 2**20:.0f} MB is over {self.config.provider}'s "
                f"limits ({most_requests:,} requests, {most_bytes // 2**20} MB): submit with a smaller --chunk-size"
            )
        return None

    def _find(self, record: bs.SlotRecord) -> bool | None:
        """True: the earlier attempt's batch is found and recorded; None: there is none; False: cannot tell yet."""
        try:
            found = self.api.find(
                record.provider_chunk_id,
                record.items[0].custom_id.split("-")[0] + "-",
                len(record.items),
                record.intent_at,
                lambda batch_id: bs.taken_by_another(self.connection, record.slot, batch_id),
            )
        except ProviderError as exc:
            log.warning("%s: looking for its batch: %s", record.slot, exc, extra={"run_id": record.run_id})
            return False
        if found is None:
            return None
        log.info(
            "%s: found its batch %s made by an earlier attempt", record.slot, found, extra={"run_id": record.run_id}
        )
        bs.record_batch(self.connection, record, found, bs.now(), None, "created")
        self._record_in_sql(record)
        return True

    def _hold_budget(self, record: bs.SlotRecord) -> bool:
        """Hold the batch's worst case against --max-cost before it is made (once per slot)."""
        if "hold" in record.extra:
            return True
        try:
            hold = reserve_batch(
                self.connection,
                record.run_id,
                self.config.max_cost,
                sum(i.worst_case_nano for i in record.items),
                HOLD_SECONDS,
            )
        except BudgetExceeded as exc:
            log.warning("%s: %s; its rows are left for resume", record.slot, exc, extra={"run_id": record.run_id})
            bs.release_tokens(self.connection, record.slot, self.target)
            handoff.publish_event(
                self.connection,
                self.settings.result_stream,
                handoff.STATUS,
                {"run_id": record.run_id, "status": BUDGET_EXHAUSTED},
            )
            self._end_unmade(record, "skipped")
            return False
        if hold is None:
            bs.release_tokens(self.connection, record.slot, self.target)
            return False
        bs.set_fields(self.connection, record.slot, hold=hold)
        return True

    def _end_unmade(self, record: bs.SlotRecord, state: str) -> None:
        """The slot ends without a batch (run cancelled or out of budget): its rows are left for ``resume``."""
        self._settle(record, 0)
        bs.release_tokens(self.connection, record.slot, self.target)
        bs.finish(self.connection, record, state, self.settings.run_retention_seconds)
        self._record_in_sql(record, state)
        record.done = True

    def _fail_slot(self, record: bs.SlotRecord, error: str) -> None:
        self._publish([r for item in record.items for r in self._failed(item, redact(error), record)])
        self._end_unmade(record, "failed")

    def _settle(self, record: bs.SlotRecord, cost_nano: int) -> None:
        hold = bs.take_field(self.connection, record.slot, "hold")
        if hold:
            settle_batch(self.connection, record.run_id, hold, cost_nano)

    # --- collecting ------------------------------------------------------------------------------------------
    def _collect(self, record: bs.SlotRecord, state: str, outcomes: dict[str, ItemOutcome], cancelled: bool) -> None:
        """Hand over every answer, fail what cannot succeed, send what may succeed into the next round."""
        results: list[Result] = []
        again: list[bs.Item] = []
        for item in record.items:
            outcome = outcomes.get(item.custom_id) or ItemOutcome(
                item.custom_id,
                error="no outcome in the batch's results",
                retryable=state != CANCELLED,
                cancelled=state == CANCELLED,
            )
            if outcome.response is not None:
                results += self._answered(item, outcome.response, record)
            elif outcome.cancelled or (cancelled and outcome.retryable):
                continue  # never run: left for resume
            elif outcome.retryable and record.round < self.settings.batch_max_rounds:
                again.append(item)
            else:
                results += self._failed(item, redact(outcome.error or "failed"), record)
        self._publish(results)
        self._settle(record, sum(r.cost_nano or 0 for r in results))
        bs.release_tokens(self.connection, record.slot, self.target)
        next_slot = self._next_round(record, again) if again else None
        bs.finish(self.connection, record, state, self.settings.run_retention_seconds)
        self._record_in_sql(record, state)
        log.info(
            "batch %s of %s %s: %d results, %d items to round %d",
            record.batch_id,
            record.slot,
            state,
            len(results),
            len(again),
            record.round + 1,
            extra={"run_id": record.run_id},
        )
        if next_slot is not None:
            self.follow(next_slot)

    def _next_round(self, record: bs.SlotRecord, items: list[bs.Item]) -> str:
        slot = bs.slot_id(record.run_id, record.chunk, record.round + 1)
        tag = stable_hash(slot)[:12]
        fresh = [bs.Item(**{**i.to_dict(), "custom_id": item_id(tag, i.cache_key)}) for i in items]
        following = bs.SlotRecord(
            slot=slot, run_id=record.run_id, chunk=record.chunk, round=record.round + 1, items=fresh, intent_at=bs.now()
        )
        if bs.save_intent(self.connection, following):
            self._record_in_sql(following)
        return slot

    def _answered(
        self, item: bs.Item, answer: ProviderResponse, record: bs.SlotRecord | None, cached: bool = False
    ) -> list[Result]:
        """Results for every row of the item: the first row carries what the answer cost, the repeats are free
        (as the online mode's cache hits are)."""
        now = bs.now()
        parsed, error = self._parse(answer.text)
        cost = None if self.price is None else self.price.cost_nano(answer.input_tokens, answer.output_tokens)
        if record is not None and self.config.use_cache and error is None:
            self.connection.set(
                item.cache_key,
                json.dumps(
                    {
                        "text": answer.text,
                        "input_tokens": answer.input_tokens,
                        "output_tokens": answer.output_tokens,
                        "model": answer.model,
                    },
                    ensure_ascii=False,
                ),
                ex=self.settings.cache_ttl,
            )
        results = []
        paid_round = record.round if record is not None else 0
        for n, row in enumerate(item.rows):
            paid = record is not None and n == 0 and not cached
            result = Result(
                run_id=self.config.run_id,
                row_key=row["key"],
                row_index=row["index"],
                status=SUCCEEDED if error is None else "failed",
                input=row["values"],
                prompt_hash=item.prompt_hash,
                answer=answer.text,
                parsed=parsed,
                error=error,
                provider=self.config.provider,
                model=answer.model or self.config.model,
                attempts=paid_round if paid else 0,
                input_tokens=answer.input_tokens if paid else 0,
                output_tokens=answer.output_tokens if paid else 0,
                cost_nano=(cost if paid else 0),
                cached=not paid,
                latency_ms=round((now - record.intent_at) * 1000, 3) if record is not None else 0.0,
                finished_at=now,
                calls={f"{self.target.replace(':', '|', 1)}|batch": 1} if paid else {},
                batch_id=record.batch_id if record is not None else None,
            )
            results.append(result)
        return results

    def _failed(self, item: bs.Item, error: str, record: bs.SlotRecord) -> list[Result]:
        results = []
        for row in item.rows:
            result = Result.failure(self.config.run_id, Row(row["key"], row["index"], row["values"]), error[:2000])
            result.provider, result.model, result.prompt_hash = (
                self.config.provider,
                self.config.model,
                item.prompt_hash,
            )
            result.attempts, result.batch_id = record.round, record.batch_id
            results.append(result)
        return results

    def _parse(self, text: str) -> tuple[Any, str | None]:
        if self.config.json_schema is None:
            return None, None
        import jsonschema

        try:
            parsed = json.loads(text)
            jsonschema.validate(parsed, self.config.json_schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            return None, f"answer does not match the JSON schema ({type(exc).__name__})"
        return parsed, None

    def _publish(self, results: list[Result]) -> None:
        for start in range(0, len(results), PUBLISH_AT_ONCE):
            handoff.publish_results(
                self.connection, self.settings.result_stream, results[start : start + PUBLISH_AT_ONCE]
            )


def schedule_poll(connection: redis.Redis, settings: Settings, run_id: str, slot: str, wait: float) -> None:
    """A poll job for the slot in ``wait`` seconds, unless one is already queued or scheduled."""
    job_id = poll_job_id(slot)
    existing = Job.fetch_many([job_id], connection=connection, serializer="json")[0]
    if existing is not None and existing.get_status(refresh=False) in ACTIVE_JOB_STATES:
        return
    chunk_queue(connection, settings).enqueue_in(
        timedelta(seconds=max(1, math.ceil(wait))),
        BATCH_POLL_FUNCTION,
        {"run_id": run_id, "slot": slot},
        job_id=job_id,
        job_timeout=settings.job_timeout,
        result_ttl=600,
        failure_ttl=7 * 24 * 3600,
        description=f"run {run_id} batch {slot}",
        meta={"run_id": run_id, "slot": slot},
    )


def wake_polls(connection: redis.Redis, settings: Settings, run_id: str) -> int:
    """Move the run's scheduled poll jobs to the queue now (after a cancel: they cancel their batches)."""
    queue = chunk_queue(connection, settings)
    woken = 0
    for record in bs.run_batches(connection, run_id):
        if record.done:
            continue
        job = Job.fetch_many([poll_job_id(record.slot)], connection=connection, serializer="json")[0]
        if job is not None and job.get_status(refresh=False) == JobStatus.SCHEDULED:
            queue.scheduled_job_registry.remove(job)
            queue.enqueue_job(job)
            woken += 1
    return woken
