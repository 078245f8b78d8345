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
import uuid
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aioredis

from pipeline.errors import BudgetExceeded
from pipeline.pricing import NANO

# KEYS: spend, holds. ARGV: cap (-1 = none), amount, now, hold expiry, member. 1 = held, 0 = wait, -1 = exhausted.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local cap, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if cap >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
  local held = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    held = held + tonumber(string.match(member, ':(%d+)$'))
  end
  if spent + held + amount > cap then
    if held > 0 then return 0 end
    return -1
  end
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""

WAIT_SECONDS = 0.05


def spend_key(run_id: str) -> str:
    return f"run:{run_id}:spend"


def holds_key(run_id: str) -> str:
    return f"run:{run_id}:holds"


class RunBudget:
    def __init__(self, client: aioredis.Redis, run_id: str, max_cost: float | None, *, hold_seconds: float) -> None:
        self._client = client
        self._keys = [spend_key(run_id), holds_key(run_id)]
        self._cap = -1 if max_cost is None else round(max_cost * NANO)
        self._hold_seconds = hold_seconds
        self._reserve = client.register_script(_RESERVE)

    async def reserve(self, amount: int, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> str:
        """Hold ``amount`` nano-dollars against the cap (waiting while other holds are out) or raise
        BudgetExceeded. ``sleep`` waits between tries; the caller's may end the wait (a cancel) by raising."""
        if self._cap < 0:
            return ""  # no cap: nothing to enforce, and the spend is summed from the results anyway
        member = f"{uuid.uuid4().hex}:{amount}"
        while True:
            now = await self._now()
            verdict = int(
                await self._reserve(keys=self._keys, args=[self._cap, amount, now, now + self._hold_seconds, member])
            )
            if verdict == 1:
                return member
            if verdict < 0:
                raise BudgetExceeded(f"the run's budget of ${self._cap / NANO:.4f} is spent")
            await sleep(WAIT_SECONDS)

    async def settle(self, hold: str, actual: int) -> None:
        """Release the hold and add what the call really cost (nano-dollars: the very amount its result carries
        to SQL)."""
        if not hold:
            return
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(self._keys[1], hold)
            pipe.incrby(self._keys[0], actual)
            await pipe.execute()

    async def _now(self) -> float:
        seconds, micros = await self._client.time()
        return seconds + micros / 1e6


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
    seconds, micros = connection.time()
    now = seconds + micros / 1e6
    member = f"{uuid.uuid4().hex}:{amount}"
    verdict = int(
        connection.eval(_RESERVE, 2, spend_key(run_id), holds_key(run_id), cap, amount, now, now + hold_seconds, member)
    )
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
