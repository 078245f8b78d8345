"""A run's spending cap (``--max-cost``), enforced in Redis before each call is sent.

Each call holds its worst-case cost (prompt estimate + max output tokens at the model's price) and settles
to the real cost afterwards. A call that would cross the cap waits while other calls' holds are out (they
usually settle far below their estimate) and gives up only when the settled spend alone leaves no room, so
concurrent workers use the budget fully yet never overshoot it. Holds expire, so a worker killed mid-call
cannot freeze the budget, but never before their call could still be running: the owner passes
``hold_seconds`` from its retry policy (``RetryPolicy.hold_seconds``). Amounts are nano-dollars so that Redis
integer arithmetic stays exact.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis
import redis.asyncio as aioredis

from pipeline.calls.redis_batch import RedisBatcher
from pipeline.errors import BudgetExceeded
from pipeline.pricing import NANO

# Holds of one flush, one after the other as single calls would be, on the Redis server's clock. KEYS: spend,
# holds of each. ARGV: cap (-1 = none), amount, seconds held, member of each. Each: 1 = held, 0 = wait, -1 = exhausted,
# or an error reply in its place for a hold that failed (a key of the wrong type): that row fails, not the others
# of the flush, and it holds nothing.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function hold(spend, holds, cap, amount, seconds, member)
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
  if cap >= 0 then
    local spent = tonumber(redis.call('GET', spend) or '0')
    local held = 0
    for _, other in ipairs(redis.call('ZRANGE', holds, 0, -1)) do
      held = held + tonumber(string.match(other, ':(%d+)$'))
    end
    if spent + held + amount > cap then
      if held > 0 then return 0 end
      return -1
    end
  end
  redis.call('ZADD', holds, now + seconds, member)
  return 1
end
local verdicts = {}
for i = 1, #KEYS, 2 do
  local a = (i - 1) * 2
  local ok, verdict = pcall(
    hold, KEYS[i], KEYS[i + 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  )
  if not ok then verdict = {err = type(verdict) == 'table' and verdict.err or tostring(verdict)} end
  verdicts[#verdicts + 1] = verdict
end
return verdicts
"""

WAIT_SECONDS = 0.05


def spend_key(run_id: str) -> str:
    return f"run:{run_id}:spend"


def holds_key(run_id: str) -> str:
    return f"run:{run_id}:holds"


class RunBudget:
    def __init__(
        self,
        client: aioredis.Redis,
        run_id: str,
        max_cost: float | None,
        *,
        hold_seconds: float,
        reads: RedisBatcher | None = None,
        writes: RedisBatcher | None = None,
    ) -> None:
        """``reads`` / ``writes``: the process's shared batchers (holds taken; holds settled), so that the rows of a
        loop tick take their holds in one script call and settle them in the tick's one transaction."""
        self._keys = [spend_key(run_id), holds_key(run_id)]
        self._cap = -1 if max_cost is None else round(max_cost * NANO)
        self._hold_seconds = hold_seconds
        self._reads = reads or RedisBatcher(client, transaction=False)
        self._writes = writes or RedisBatcher(client, transaction=True)

    async def reserve(self, amount: int, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> str:
        """Hold ``amount`` nano-dollars against the cap (waiting while other holds are out) or raise
        BudgetExceeded. ``sleep`` waits between tries; the caller's may end the wait (a cancel) by raising."""
        if self._cap < 0:
            return ""  # no cap: nothing to enforce, and the spend is summed from the results anyway
        member = f"{uuid.uuid4().hex}:{amount}"
        while True:
            hold = (*self._keys, self._cap, amount, self._hold_seconds, member)
            verdict = int(await self._reads.stage_item(_stage_holds, hold))
            if verdict == 1:
                return member
            if verdict < 0:
                raise BudgetExceeded(f"the run's budget of ${self._cap / NANO:.4f} is spent")
            await sleep(WAIT_SECONDS)

    async def settle(self, hold: str, actual: int) -> None:
        """Release the hold and add what the call really cost (nano-dollars: the very amount its result carries
        to SQL), both at once."""
        if not hold:
            return
        await self._writes.run(functools.partial(_stage_settle, self._keys, hold, actual))


def _stage_holds(pipe: Any, holds: list[tuple[str, str, int, int, float, str]]) -> None:
    """One script for the holds of a flush: (spend key, holds key, cap, amount, seconds held, member) each."""
    keys = [key for hold in holds for key in hold[:2]]
    pipe.eval(_RESERVE, len(keys), *keys, *(value for hold in holds for value in hold[2:]))


def _stage_settle(keys: list[str], hold: str, actual: int, pipe: Any) -> None:
    pipe.zrem(keys[1], hold)
    pipe.incrby(keys[0], actual)


async def spent(client: aioredis.Redis, run_id: str) -> float:
    return int(await client.get(spend_key(run_id)) or 0) / NANO


def reserve_batch(
    connection: redis.Redis, run_id: str, max_cost: float | None, amount: int, hold_seconds: float
) -> str | None:
    """Batch mode: hold a whole batch's worst case before it is created (the same holds as single calls, held
    for the batch's life). '' without a cap; None while other holds are out (try later: they may settle far
    below their estimate); BudgetExceeded when the settled spend alone leaves no room."""
    if max_cost is None:
        return ""
    cap = round(max_cost * NANO)
    member = f"{uuid.uuid4().hex}:{amount}"
    [verdict] = cast(
        list[Any], connection.eval(_RESERVE, 2, spend_key(run_id), holds_key(run_id), cap, amount, hold_seconds, member)
    )
    if isinstance(verdict, Exception):  # the script's error reply in the hold's place
        raise verdict
    if verdict == 1:
        return member
    if verdict < 0:
        raise BudgetExceeded(
            f"the run's budget of ${cap / NANO:.4f} cannot hold a batch of at most ${amount / NANO:.6f}"
        )
    return None


def settle_batch(connection: redis.Redis, run_id: str, hold: str, actual: int) -> None:
    """Release a batch's hold and add what its answers cost."""
    if not hold:
        return
    with connection.pipeline(transaction=True) as pipe:
        pipe.zrem(holds_key(run_id), hold)
        pipe.incrby(spend_key(run_id), actual)
        pipe.execute()
