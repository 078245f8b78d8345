"""A run's spending cap (``--max-cost``), enforced in Redis before each call is sent.

Each call reserves its worst-case cost (prompt estimate + max output tokens at the model's price) and settles
to the real cost afterwards, so concurrent workers can overshoot the cap by at most the calls in flight.
Amounts are kept in micro-dollars so that Redis integer arithmetic stays exact.
"""
from __future__ import annotations

import redis.asyncio as aioredis

from .errors import BudgetExceeded

_RESERVE = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local cap, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
if spent + amount > cap then return -1 end
return redis.call('INCRBY', KEYS[1], amount)
"""

MICRO = 1_000_000


def spend_key(run_id: str) -> str:
    return f"run:{run_id}:spend"


class RunBudget:
    def __init__(self, client: aioredis.Redis, run_id: str, max_cost: float | None) -> None:
        self._client = client
        self._key = spend_key(run_id)
        self._cap = None if max_cost is None else int(max_cost * MICRO)
        self._reserve = client.register_script(_RESERVE)

    async def reserve(self, estimated_cost: float) -> int:
        """Hold ``estimated_cost`` against the cap or raise BudgetExceeded. Returns the held micro-dollars."""
        amount = int(round(estimated_cost * MICRO))
        if self._cap is None:
            await self._client.incrby(self._key, amount)
            return amount
        if int(await self._reserve(keys=[self._key], args=[self._cap, amount])) < 0:
            raise BudgetExceeded(f"the run's budget of ${self._cap / MICRO:.4f} would be exceeded")
        return amount

    async def settle(self, held: int, actual_cost: float) -> None:
        delta = int(round(actual_cost * MICRO)) - held
        if delta:
            await self._client.incrby(self._key, delta)


async def spent(client: aioredis.Redis, run_id: str) -> float:
    return int(await client.get(spend_key(run_id)) or 0) / MICRO
