"""The claim protocol of the response cache, on a real Redis (its clock runs the claims' expiry)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from pipeline.calls.cache import ALONE, ASK, HIT, WAIT, ResponseCache
from pipeline.providers.base import ProviderResponse

KEY = "cache:{claim-test}"


def run(scenario, redis_url):
    async def main():
        client = aioredis.Redis.from_url(redis_url)
        await client.delete(KEY, KEY + ":asking")
        try:
            return await scenario(client)
        finally:
            await client.delete(KEY, KEY + ":asking")
            await client.aclose()

    return asyncio.run(main())


def test_a_claim_is_renewed_while_its_call_runs_and_lapses_when_its_owner_is_gone(redis_url):
    async def scenario(client):
        owner, other = (ResponseCache(client, claimant=name, claim_seconds=0.3) for name in ("A", "B"))
        seen = [(await owner.get_or_claim(KEY))[0], (await other.get_or_claim(KEY))[0]]
        async with owner.holding(KEY):
            await asyncio.sleep(0.7)  # more than twice the claim's life: renewed meanwhile
            seen.append((await other.get_or_claim(KEY))[0])
        seen.append((await owner.get_or_claim(KEY))[0])  # its own claim: the owner (a retried chunk) takes it back
        deadline = time.monotonic() + 5  # the owner is gone now: nobody renews the claim
        while (verdict := (await other.get_or_claim(KEY))[0]) == WAIT and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return seen + [verdict]

    assert run(scenario, redis_url) == [ASK, WAIT, WAIT, ASK, ASK]


def test_a_failed_call_lets_the_waiters_ask_alone_and_an_answer_ends_the_claim(redis_url):
    async def scenario(client):
        owner, other, third = (ResponseCache(client, claimant=name) for name in ("A", "B", "C"))
        seen = [(await owner.get_or_claim(KEY))[0]]
        await other.failed(KEY)  # not its claim: changes nothing
        seen.append((await third.get_or_claim(KEY))[0])
        await owner.failed(KEY)
        seen.append((await other.get_or_claim(KEY))[0])
        await other.put(KEY, ProviderResponse(text="answer", input_tokens=1, output_tokens=1, model="m"))
        verdict, hit = await third.get_or_claim(KEY)
        return seen + [verdict, hit.text, await client.exists(KEY + ":asking")]

    assert run(scenario, redis_url) == [ASK, WAIT, ALONE, HIT, "answer", 0]
