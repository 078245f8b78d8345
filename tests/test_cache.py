"""The claim protocol of the response cache, on a real Redis (its clock runs the claims' expiry)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
import redis.exceptions

from pipeline.calls.cache import ALONE, ASK, HIT, WAIT, ResponseCache
from pipeline.calls.redis_batch import RedisBatcher
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


def test_lookups_and_answers_of_one_tick_go_out_as_one_script_each_and_keep_their_meaning(redis_url):
    other_key = "cache:{claim-test-2}"

    async def scenario(client):
        await client.delete(other_key, other_key + ":asking")
        reads, writes = RedisBatcher(client, transaction=False), RedisBatcher(client, transaction=True)
        owner, other = (ResponseCache(client, 60, claimant=n, reads=reads, writes=writes) for n in ("A", "B"))
        flushes = []
        for batcher in (reads, writes):
            send = batcher._send
            batcher._send = lambda batch, send=send: flushes.append(len(batch)) or send(batch)
        seen = [v for v, _ in await asyncio.gather(owner.get_or_claim(KEY), other.get_or_claim(KEY))]
        answer = ProviderResponse(text="answer é", input_tokens=1, output_tokens=2, model="m")
        await asyncio.gather(owner.store(KEY, answer), other.store(other_key, answer))
        hits = await asyncio.gather(other.get_or_claim(KEY), owner.get_or_claim(other_key))
        ttl, claims = await client.ttl(KEY), await client.exists(KEY + ":asking", other_key + ":asking")
        await client.delete(other_key)
        return seen, hits, flushes, 0 < ttl <= 60, claims

    seen, hits, flushes, expires, claims = run(scenario, redis_url)
    assert seen == [ASK, WAIT]  # the first in the tick claimed it, as one lookup after the other would
    assert [(verdict, hit.text) for verdict, hit in hits] == [(HIT, "answer é"), (HIT, "answer é")]
    assert flushes == [1, 1, 1]  # two rows, one command: lookups, answers stored, lookups
    assert expires and claims == 0


def test_a_lookup_that_fails_fails_its_row_only(redis_url):
    broken = "cache:{claim-test-broken}"

    async def scenario(client):
        await client.hset(broken, "not", "an answer")  # a key of the wrong type
        cache = ResponseCache(client, claimant="A")
        outcomes = await asyncio.gather(cache.get_or_claim(broken), cache.get_or_claim(KEY), return_exceptions=True)
        await client.delete(broken)
        return outcomes

    failed, claimed = run(scenario, redis_url)
    assert isinstance(failed, redis.exceptions.ResponseError) and "WRONGTYPE" in str(failed)
    assert claimed == (ASK, None)
