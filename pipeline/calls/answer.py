"""Answer one row: render, look in the cache, hold budget and rate limit, call with retries, validate, fall back.

Every outcome but a spent budget or a cancelled run becomes a Result, so one bad row never fails its chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from redis.exceptions import RedisError

from pipeline.calls.budget import RunBudget
from pipeline.calls.cache import ALONE, ASK, ResponseCache, cache_key
from pipeline.calls.ratelimit import SharedRateLimiter
from pipeline.calls.retry import RetryPolicy
from pipeline.errors import (
    BudgetExceeded,
    InvalidAnswer,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RowInterrupted,
    RunCancelled,
    TemplateError,
    UnreadableAnswer,
)
from pipeline.intake.templates import compiled_template
from pipeline.pricing import Price, PriceTable
from pipeline.providers.base import Provider, ProviderRequest, ProviderResponse
from pipeline.records import STOPPED, SUCCEEDED, ModelTarget, Result, Row, RunConfig, stable_hash
from pipeline.redaction import redact

log = logging.getLogger("pipeline.answer")
CLAIM_POLL_SECONDS, CLAIM_POLL_MAX_SECONDS = 0.05, 0.5
BACKOFF_STEP_SECONDS = 0.25


@dataclass
class Target:
    """A provider/model with the objects that guard its calls."""

    spec: ModelTarget
    provider: Provider
    limiter: SharedRateLimiter

    def keeps_deadline(self, deadline: float | None) -> bool:
        """Whether the provider itself ends every call within ``deadline`` (its ``deadline`` attribute: the
        SDK-wire providers' HTTP timeout is for the whole exchange), so that no timer of ours is needed."""
        own = getattr(self.provider, "deadline", None)
        return own is not None and (deadline is None or own <= deadline)


@dataclass(frozen=True)
class _Call:
    """One logical call's request and what each of its attempts holds: the token estimate, the worst-case cost."""

    target: Target
    request: ProviderRequest
    input_estimate: int
    output_cap: int
    price: Price | None
    worst_case: int

    @property
    def estimated_tokens(self) -> int:
        return self.input_estimate + self.output_cap

    def estimate(self) -> ProviderResponse:
        """What an attempt billed without saying how much is counted as: the estimate, at most the output cap."""
        return ProviderResponse("", self.input_estimate, self.output_cap, self.request.model)


@dataclass
class _Tally:
    attempts: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    input_tokens: int = 0  # of every answer received (and billed), rejected or fallen back from ones included
    output_tokens: int = 0
    cost_nano: int | None = 0  # None once an answer came from a model without a price
    errors: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    usage_estimated: int = 0  # answers billed at their estimate (no usage reported, or timed out)
    answers_billed: int = 0

    def billed(self, response: ProviderResponse, cost_nano: int | None, *, estimated: bool = False) -> None:
        self.input_tokens += response.input_tokens
        self.output_tokens += response.output_tokens
        self.cost_nano = None if cost_nano is None or self.cost_nano is None else self.cost_nano + cost_nano
        self.usage_estimated += int(estimated)
        self.answers_billed += 1

    def call(self, target: Target, outcome: str) -> None:
        key = f"{target.spec.provider}|{target.spec.model}|{outcome}"
        self.calls[key] = self.calls.get(key, 0) + 1


def call_outcome(exc: ProviderError | None) -> str:
    """A bounded label for one call: the HTTP status, or timeout / connection."""
    if exc is None:
        return "200"
    if isinstance(exc, ProviderTimeout):
        return "timeout"
    return str(exc.status) if exc.status else "connection"


def provider_request(config: RunConfig, prompt: str, model: str) -> ProviderRequest:
    """One row's call as the run's settings make it (online and batch mode alike)."""
    return ProviderRequest(
        prompt=prompt,
        model=model,
        max_tokens=config.max_tokens,
        system=config.system_prompt,
        temperature=config.temperature,
        params=config.params,
        json_schema=config.json_schema,
    )


def estimate_tokens(text: str) -> int:
    """A cheap estimate on the high side for reservations, settled to real usage later: a third of the UTF-8
    bytes (about a token per character for CJK text, a third more than real for English)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))  # ASCII: as many bytes as characters
    return max(1, -(-size // 3))


def output_limit(request: ProviderRequest) -> int:
    """The most output tokens the call may bill: ``--param max_tokens=...`` overrides ``--max-tokens``."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return request.max_tokens


class RowAnswerer:
    def __init__(
        self,
        config: RunConfig,
        targets: list[Target],
        *,
        policy: RetryPolicy,
        prices: PriceTable,
        budget: RunBudget,
        cache: ResponseCache | None,
        should_stop: Callable[[], Awaitable[bool]] | None = None,
        in_flight: dict[str, asyncio.Future[ProviderResponse | None]] | None = None,
    ) -> None:
        """``in_flight``: prompts being asked right now, shared by every chunk of the process's call window."""
        self.config = config
        self.template = compiled_template(config.template)
        self.targets = targets
        self.policy = policy
        self.prices = prices
        self.budget = budget
        self.cache = cache
        self.should_stop = should_stop
        self._in_flight = {} if in_flight is None else in_flight

    async def answer(self, row: Row) -> Result:
        """The row's result. Only BudgetExceeded and RunCancelled (row left for ``resume``) and Redis errors escape."""
        started = time.monotonic()
        try:
            return await self._answer(row, started)
        except (BudgetExceeded, RunCancelled, RedisError):
            raise  # a lost Redis fails the chunk job, which RQ retries; done rows are skipped then
        except Exception as exc:  # a bug must cost one row, not its whole chunk
            log.exception("row %s failed unexpectedly", row.key, extra={"run_id": self.config.run_id})
            error = redact(f"internal error: {type(exc).__name__}: {exc}")
            return self._finish(Result.failure(self.config.run_id, row, error), started)

    async def _answer(self, row: Row, started: float) -> Result:
        result = Result.failure(self.config.run_id, row)
        try:
            prompt = self._render(row)
        except TemplateError as exc:
            result.error = f"row {row.key}: {exc}"
            return self._finish(result, started)
        result.prompt_hash = stable_hash(prompt)[:16]
        tally = _Tally()
        try:
            await self._try_targets(result, prompt, tally)
        except RowInterrupted as exc:
            if tally.answers_billed:  # paid for: the row's spend must reach SQL even though it has no answer
                result.status, result.error = (
                    STOPPED,
                    redact(f"stopped after {tally.answers_billed} billed answer(s): {exc}")[:2000],
                )
                exc.billed = self._finish(self._with_tally(result, tally), started)
            raise
        return self._finish(self._with_tally(result, tally), started)

    async def _try_targets(self, result: Result, prompt: str, tally: _Tally) -> None:
        """The primary, then each fallback, until one answers."""
        for target in self.targets:
            request = self._request(prompt, target.spec.model)
            try:
                response, parsed, cached = await self._answer_with(target, request, tally)
            except ProviderError as exc:
                tally.errors.append(redact(str(exc)))
                continue
            self._fill_success(result, target, response, parsed, cached)
            return
        result.error = " | ".join(tally.errors)[:2000]
        result.provider, result.model = self.targets[-1].spec.provider, self.targets[-1].spec.model

    @staticmethod
    def _with_tally(result: Result, tally: _Tally) -> Result:
        result.attempts, result.timeouts, result.rate_limited = tally.attempts, tally.timeouts, tally.rate_limited
        result.input_tokens, result.output_tokens = tally.input_tokens, tally.output_tokens
        result.cost_nano = tally.cost_nano
        result.calls = tally.calls
        result.usage_estimated = tally.usage_estimated
        return result

    def _render(self, row: Row) -> str:
        prompt = self.template.render(row.values)
        if not prompt.strip():
            raise TemplateError("the template rendered an empty prompt")
        return prompt

    def _request(self, prompt: str, model: str) -> ProviderRequest:
        return provider_request(self.config, prompt, model)

    async def _answer_with(
        self, target: Target, request: ProviderRequest, tally: _Tally
    ) -> tuple[ProviderResponse, Any, bool]:
        key = cache_key(target.spec.provider, request, getattr(target.provider, "base_url", None))
        if self.cache is None or not self.config.use_cache:  # --no-cache: ask anew, but keep the answer
            return (*await self._fresh_answer(target, request, tally, key), False)
        shared = self._in_flight.get(key)
        if shared is None:
            return await self._speak_for_process(key, target, request, tally)
        hit = await asyncio.shield(shared)  # another row of this process speaks for this prompt: take its answer
        if hit is not None:
            return hit, self._validate(hit.text), True
        return (*await self._fresh_answer(target, request, tally, key), False)  # its call failed: ask alone

    async def _speak_for_process(
        self, key: str, target: Target, request: ProviderRequest, tally: _Tally
    ) -> tuple[ProviderResponse, Any, bool]:
        """Get a prompt's answer for every row of this process that has it: from the cache, by waiting while
        another worker asks for it, or by claiming it and asking. Rows repeating it meanwhile wait on ``_in_flight``."""
        cache = self.cache
        assert cache is not None  # only called with the response cache on
        shared: asyncio.Future[ProviderResponse | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = shared
        answer: ProviderResponse | None = None
        stored: asyncio.Future[Any] | None = None
        try:
            delay = CLAIM_POLL_SECONDS
            while True:
                verdict, answer = await cache.get_or_claim(key)
                if answer is not None:
                    return answer, self._validate(answer.text), True
                if verdict in (ASK, ALONE):  # ALONE: a call for it just failed, so ask without a claim
                    async with cache.holding(key) if verdict == ASK else contextlib.nullcontext():
                        answer, parsed = await self._fresh_answer(target, request, tally, key, store=False)
                    stored = cache.store(key, answer)
                    return answer, parsed, False
                await asyncio.sleep(delay)  # another worker is asking it: its answer lands in the cache
                delay = min(delay * 2, CLAIM_POLL_MAX_SECONDS)
                await self._unless_cancelled()
        finally:
            try:
                if answer is None:
                    await cache.failed(key)  # (only if this chunk held the claim) before waiters wake
            finally:
                shared.set_result(answer)
                if stored is None or stored.done():
                    del self._in_flight[key]
                else:  # until the answer is in Redis, the process's rows that repeat the prompt take it from here
                    stored.add_done_callback(lambda _: self._forget(key, shared))

    def _forget(self, key: str, shared: asyncio.Future[ProviderResponse | None]) -> None:
        if self._in_flight.get(key) is shared:
            del self._in_flight[key]

    async def _fresh_answer(
        self, target: Target, request: ProviderRequest, tally: _Tally, key: str, *, store: bool = True
    ) -> tuple[ProviderResponse, Any]:
        """Call the provider (again, while the answer fails the JSON schema); cache the valid answer (unless the
        caller stores it itself)."""
        tries = self.config.schema_attempts if self.config.json_schema else 1
        for attempt in range(1, tries + 1):
            response = await self._call(target, request, tally)
            try:
                parsed = self._validate(response.text)
            except InvalidAnswer as exc:
                if attempt == tries:
                    raise InvalidAnswer(f"{target.spec}: {exc} (after {tries} answers)") from None
                continue
            if store and self.cache is not None:
                self.cache.store(key, response)  # goes out with the row's hand-over
            return response, parsed
        raise AssertionError("unreachable")

    async def _call(self, target: Target, request: ProviderRequest, tally: _Tally) -> ProviderResponse:
        """One logical call, retried by the policy; every attempt holds budget and rate limit first."""
        input_estimate, output_cap = estimate_tokens((request.system or "") + request.prompt), output_limit(request)
        price = self.prices.price(request.model)  # None: the run has no cap (submit refuses a cap without a price)
        worst_case = price.cost_nano(input_estimate, output_cap) if price else 0
        call = _Call(target, request, input_estimate, output_cap, price, worst_case)
        return await self.policy.call(functools.partial(self._attempt, call, tally), self._sleep_unless_cancelled)

    async def _attempt(self, call: _Call, tally: _Tally) -> ProviderResponse:
        target, request = call.target, call.request
        await self._unless_cancelled()
        try:
            await target.limiter.acquire(call.estimated_tokens, sleep=self._sleep_unless_cancelled)
            # after the wait: the hold cannot expire in it; a cancel ends a wait for room in the budget
            held = await self.budget.reserve(call.worst_case, sleep=self._sleep_unless_cancelled)
        except (RunCancelled, BudgetExceeded):
            await target.limiter.release(call.estimated_tokens)  # the limit is shared with other runs
            raise
        tally.attempts += 1
        called = time.monotonic()
        try:
            response = await self._complete(target, request)
        except UnreadableAnswer:  # likely billed: its estimate is counted once, and it is not asked again
            self._log_call(target, "unreadable", called)
            tally.call(target, "200")
            tally.billed(call.estimate(), call.worst_case if call.price else None, estimated=True)
            await self.budget.settle(held, call.worst_case)
            raise
        except ProviderError as exc:
            self._log_call(target, call_outcome(exc), called)
            tally.call(target, call_outcome(exc))
            await self._after_failure(exc, held, call, tally)
            raise
        self._log_call(target, "200", called)
        tally.call(target, "200")
        if not response.usage_reported:  # billed, but by how much nobody said: the reserved worst case
            response = dataclasses.replace(response, input_tokens=call.input_estimate, output_tokens=call.output_cap)
        cost = call.price.cost_nano(response.input_tokens, response.output_tokens) if call.price else None
        tally.billed(response, cost, estimated=not response.usage_reported)
        await self.budget.settle(held, cost or 0)
        # a provider's TPM limit counts the max output tokens when it admits a call (OpenAI), not the
        # tokens the answer used: refunding those makes the bucket run ahead of the provider's (429s)
        await target.limiter.settle(call.estimated_tokens, response.input_tokens + call.output_cap)
        if response.rate_limit is not None:
            await target.limiter.follow_provider(
                response.rate_limit.remaining_requests, response.rate_limit.remaining_tokens
            )
        return response

    def _log_call(self, target: Target, outcome: str, called: float) -> None:
        """One DEBUG line per provider call; the chunk's INFO summary (jobs.process_chunk) adds them up."""
        if log.isEnabledFor(logging.DEBUG):
            seconds = round(time.monotonic() - called, 3)
            log.debug(
                "call %s: %s in %.3f s",
                target.spec,
                outcome,
                seconds,
                extra={
                    "run_id": self.config.run_id,
                    "provider": target.spec.provider,
                    "model": target.spec.model,
                    "outcome": outcome,
                    "seconds": seconds,
                },
            )

    async def _complete(self, target: Target, request: ProviderRequest) -> ProviderResponse:
        if target.keeps_deadline(self.policy.call_deadline):  # a timer per call cost more than the row's own work
            return await target.provider.complete(request)
        try:
            async with asyncio.timeout(self.policy.call_deadline):
                return await target.provider.complete(request)
        except TimeoutError:
            raise ProviderTimeout(f"{target.spec}: no complete answer in {self.policy.call_deadline:g} s") from None

    async def _sleep_unless_cancelled(self, seconds: float) -> None:
        """Sleep (a backoff, a rate-limit wait) in short steps, so that a cancel is noticed even in a long one."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, BACKOFF_STEP_SECONDS))
            await self._unless_cancelled()

    async def _unless_cancelled(self) -> None:
        if self.should_stop is not None and await self.should_stop():
            raise RunCancelled(f"run {self.config.run_id} was cancelled")

    async def _after_failure(self, exc: ProviderError, held: str, call: _Call, tally: _Tally) -> None:
        """Settle the budget hold and tell the limiter. A timed-out call may still be billed: its worst case is
        spent, in Redis and on the row's result alike."""
        if isinstance(exc, ProviderTimeout):
            tally.timeouts += 1
            tally.billed(call.estimate(), call.worst_case if call.price else None, estimated=True)
            await self.budget.settle(held, call.worst_case)
            return
        await self.budget.settle(held, 0)
        if isinstance(exc, RateLimited):
            tally.rate_limited += 1
            await call.target.limiter.pause(self.policy.provider_wait(exc.retry_after) or self.policy.backoff_base)

    def _validate(self, text: str) -> Any:
        if self.config.json_schema is None:
            return None
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidAnswer(f"answer is not JSON ({exc.msg})") from None
        try:
            jsonschema.validate(parsed, self.config.json_schema)
        except jsonschema.ValidationError as exc:
            raise InvalidAnswer(f"answer fails the JSON schema: {exc.message}") from None
        return parsed

    def _fill_success(
        self, result: Result, target: Target, response: ProviderResponse, parsed: Any, cached: bool
    ) -> None:
        result.status = SUCCEEDED
        result.answer = response.text
        result.parsed = parsed
        result.provider = target.spec.provider
        result.model = response.model or target.spec.model
        result.cached = cached

    @staticmethod
    def _finish(result: Result, started: float) -> Result:
        result.latency_ms = round((time.monotonic() - started) * 1000, 3)
        result.finished_at = time.time()
        return result
