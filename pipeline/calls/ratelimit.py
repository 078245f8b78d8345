"""One requests-per-minute and tokens-per-minute budget per provider/model, shared by every worker via Redis.

A small Lua GCRA (generic cell rate algorithm) rather than the ``limits`` library: ``limits[redis]`` pins
redis<8, never blocks, and cannot refund an over-estimate; this script reserves, settles and follows the
provider's own headers atomically, and uses the Redis server's clock so worker clocks may drift.
Each call reserves its estimated cost and gets back how long to wait: callers queue in arrival order
instead of polling, and the bucket never lets more than ``burst_seconds`` of budget out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from pipeline.calls.redis_batch import RedisBatcher

# Reservations of one flush, one after the other as single calls would be. KEYS: the buckets of each call.
# ARGV: per call, how many buckets, then per bucket (rate_per_second, burst_seconds, cost). Returns each call's
# wait in µs, or an error reply in its place for a call that failed (a bucket of the wrong type): that row fails,
# not the others of the flush.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function reserve(k, a, buckets)
  local wait = 0
  for b = 0, buckets - 1 do
    local key, at = KEYS[k + b], a + b * 3
    local rate, burst, cost = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new_tat = tat + cost / rate
    local w = new_tat - burst - now
    if w > wait then wait = w end
    redis.call('SET', key, string.format('%.6f', new_tat), 'EX', math.ceil(new_tat - now + burst + 60))
  end
  return math.floor(wait * 1e6)
end
local waits = {}
local k, a = 1, 1
while a <= #ARGV do
  local buckets = tonumber(ARGV[a])
  local ok, wait = pcall(reserve, k, a, buckets)
  if not ok then wait = {err = type(wait) == 'table' and wait.err or tostring(wait)} end
  waits[#waits + 1] = wait
  k, a = k + buckets, a + 1 + buckets * 3
end
return waits
"""

# Move buckets' theoretical arrival times, one after the other. KEYS: the buckets. ARGV: per bucket (rate, burst,
# refund_units, min_wait_s, remaining_units). refund > 0 gives back an over-estimate; min_wait pauses everyone
# (after a 429); remaining >= 0 makes the bucket believe no more than the provider reported as left. Returns 1 for
# each, or an error reply in its place for a move that failed (a bucket of the wrong type): that row fails alone.
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function move(key, rate, burst, refund, min_wait, remaining)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  tat = tat - refund / rate
  if min_wait > 0 and tat < now + burst + min_wait then tat = now + burst + min_wait end
  if remaining >= 0 then
    local floor_tat = now + burst - remaining / rate
    if tat < floor_tat then tat = floor_tat end
  end
  redis.call('SET', key, string.format('%.6f', tat), 'EX', math.ceil(math.max(tat - now, 0) + burst + 60))
  return 1
end
local moved = {}
for i, key in ipairs(KEYS) do
  local a = (i - 1) * 5
  local ok, done = pcall(
    move, key, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
    tonumber(ARGV[a + 5])
  )
  if not ok then done = {err = type(done) == 'table' and done.err or tostring(done)} end
  moved[i] = done
end
return moved
"""


@dataclass(frozen=True)
class Limit:
    key: str
    per_minute: float
    burst_seconds: float

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


class SharedRateLimiter:
    """Requests and tokens budgets for one provider/model; an unset limit is not enforced."""

    def __init__(
        self,
        client: aioredis.Redis,
        scope: str,
        *,
        rpm: float | None,
        tpm: float | None,
        burst_seconds: float = 0.1,
        headroom: float = 0.0,
        batcher: RedisBatcher | None = None,
    ) -> None:
        """``headroom``: the share of each limit left unused. A bucket lets ``burst_seconds`` of budget out
        above its rate; a provider that counts over a sliding window of W seconds sees that as burst / W over
        its limit, so a little headroom keeps every window under it. ``batcher``: the process's shared one (a
        non-transactional RedisBatcher): every row's reservations and moves of a loop tick go out as one script
        call each."""
        self._batcher = batcher or RedisBatcher(client, transaction=False)
        keep = 1.0 - headroom
        self.requests = Limit(f"ratelimit:{scope}:requests", rpm * keep, burst_seconds) if rpm else None
        self.tokens = Limit(f"ratelimit:{scope}:tokens", tpm * keep, burst_seconds) if tpm else None

    @property
    def enabled(self) -> bool:
        return self.requests is not None or self.tokens is not None

    async def acquire(self, estimated_tokens: int, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> float:
        """Reserve one request and ``estimated_tokens``; sleep until the budget allows. Returns seconds waited.
        ``sleep`` may raise to give up the wait (a cancelled run): the caller then ``release``s the reservation."""
        if self.requests is None and self.tokens is None:  # no limit set: nothing to reserve (every row asks)
            return 0.0
        wait = await self._reserve(
            [(lim, cost) for lim, cost in ((self.requests, 1), (self.tokens, estimated_tokens)) if lim]
        )
        if wait > 0:
            await sleep(wait)
        return wait

    async def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Give back (or charge) the difference between the reserved estimate and the real usage."""
        if self.tokens and actual_tokens != estimated_tokens:
            await self._move(self.tokens, refund=estimated_tokens - actual_tokens)

    async def release(self, estimated_tokens: int) -> None:
        """Give back a whole reservation whose call was never sent (the run was cancelled or its budget spent)."""
        if self.requests:
            await self._move(self.requests, refund=1)
        if self.tokens:
            await self._move(self.tokens, refund=estimated_tokens)

    async def pause(self, seconds: float) -> None:
        """After a 429, make every worker wait ``seconds`` before its next call to this model."""
        for limit in (self.requests, self.tokens):
            if limit:
                await self._move(limit, min_wait=seconds)

    async def follow_provider(self, remaining_requests: float | None, remaining_tokens: float | None) -> None:
        """When the provider says less budget is left than the bucket believes, believe the provider."""
        if self.requests and remaining_requests is not None:
            await self._move(self.requests, remaining=remaining_requests)
        if self.tokens and remaining_tokens is not None:
            await self._move(self.tokens, remaining=remaining_tokens)

    async def _reserve(self, costs: list[tuple[Limit, float]]) -> float:
        """Reserve each limit's cost at once; returns the wait in seconds the limits ask for (the longest)."""
        argv: list[float] = [len(costs)]
        for limit, cost in costs:
            argv += (limit.rate, limit.burst_seconds, cost)
        return int(await self._batcher.stage_item(_stage_reserves, ([lim.key for lim, _ in costs], argv))) / 1e6

    async def _move(self, limit: Limit, *, refund: float = 0, min_wait: float = 0, remaining: float = -1) -> None:
        args = (limit.rate, limit.burst_seconds, refund, min_wait, remaining)
        await self._batcher.stage_item(_stage_moves, (limit.key, args))


def _stage_reserves(pipe: Pipeline, calls: list[tuple[list[str], list[float]]]) -> None:
    """One script for the reservations of a flush: (the buckets, how many and each one's rate, burst and cost)."""
    keys = [key for call_keys, _ in calls for key in call_keys]
    pipe.eval(_RESERVE, len(keys), *keys, *(value for _, argv in calls for value in argv))


def _stage_moves(pipe: Pipeline, moves: list[tuple[str, tuple[float, ...]]]) -> None:
    """One script for the moves of a flush: (bucket, its rate, burst, refund, pause and remaining) each."""
    pipe.eval(_ADJUST, len(moves), *(key for key, _ in moves), *(value for _, args in moves for value in args))
