"""The shared rate limiter's arithmetic, on a real Redis (waits are computed by its Lua script and clock)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.exceptions

from pipeline.calls.ratelimit import SharedRateLimiter
from pipeline.calls.redis_batch import RedisBatcher

from .conftest import with_async_redis


def run(scenario, redis_url):
    return with_async_redis(scenario, redis_url)


def test_burst_then_paced(redis_url):
    async def scenario(client):
        limiter = SharedRateLimiter(client, "t:burst", rpm=6000, tpm=None, burst_seconds=0.1)  # 100/s, burst 10
        waits = [await limiter.acquire(1) for _ in range(12)]
        return waits

    waits = run(scenario, redis_url)
    assert all(w == 0 for w in waits[:9])  # a burst of about a tenth of a second goes at once
    assert 0 < waits[11] <= 0.03  # then one request per 10 ms


async def quoted_wait(limiter: SharedRateLimiter, limit, cost: float) -> float:
    """What the bucket would make a caller wait for ``cost`` now (reserves it, does not sleep)."""
    return await limiter._reserve([(limit, cost)])


def test_over_estimate_is_refunded(redis_url):
    async def scenario(client):
        limiter = SharedRateLimiter(client, "t:refund", rpm=None, tpm=60_000, burst_seconds=1.0)  # 1000 tok/s
        first = await limiter.acquire(1000)  # the whole burst
        await limiter.settle(1000, 100)  # it really used 100: 900 come back
        return first, await quoted_wait(limiter, limiter.tokens, 800)

    first, after_refund = run(scenario, redis_url)
    assert first == 0
    assert after_refund == 0  # without the refund this would wait 0.8 s


def test_provider_remaining_header_is_believed(redis_url):
    async def scenario(client):
        limiter = SharedRateLimiter(client, "t:follow", rpm=None, tpm=60_000, burst_seconds=1.0)
        await limiter.follow_provider(None, 0)  # the provider says no tokens are left
        return await quoted_wait(limiter, limiter.tokens, 500)

    assert run(scenario, redis_url) == pytest.approx(0.5, abs=0.02)  # 500 tokens must refill first


def test_429_pauses_every_caller(redis_url):
    async def scenario(client):
        limiter = SharedRateLimiter(client, "t:pause", rpm=6000, tpm=60_000, burst_seconds=0.5)
        await limiter.pause(0.2)
        return (await quoted_wait(limiter, limiter.requests, 0), await quoted_wait(limiter, limiter.tokens, 0))

    requests_wait, tokens_wait = run(scenario, redis_url)
    assert 0.18 <= requests_wait <= 0.21 and 0.18 <= tokens_wait <= 0.21


def test_two_limiters_share_one_budget(redis_url):
    async def scenario(client):
        a = SharedRateLimiter(client, "t:shared", rpm=600, tpm=None, burst_seconds=0.5)  # 10/s, burst 5
        b = SharedRateLimiter(client, "t:shared", rpm=600, tpm=None, burst_seconds=0.5)
        return [await (a if i % 2 else b)._reserve([(a.requests, 1)]) for i in range(10)]

    waits = run(scenario, redis_url)
    assert waits[:4] == [0, 0, 0, 0]
    assert waits[9] == pytest.approx(0.5, abs=0.02)  # ten requests at 10/s with 0.5 s of burst


def test_a_reservation_never_sent_is_given_back_whole(redis_url):
    """A row cancelled (or out of budget) after its rate-limit wait must not cost other runs their budget."""

    async def scenario(client):
        limiter = SharedRateLimiter(client, "t:release", rpm=60, tpm=60_000, burst_seconds=1.0)  # 1 req/s
        await limiter.acquire(1000)
        await limiter.release(1000)
        return (await quoted_wait(limiter, limiter.requests, 1), await quoted_wait(limiter, limiter.tokens, 1000))

    assert run(scenario, redis_url) == (0, 0)


def test_reservations_of_one_tick_share_a_script_call_and_queue_in_order(redis_url):
    async def scenario(client):
        limiter = SharedRateLimiter(client, f"t:tick:{uuid.uuid4().hex}", rpm=6000, tpm=None, burst_seconds=0.1)
        return await asyncio.gather(*(limiter._reserve([(limiter.requests, 1)]) for _ in range(12)))

    waits = run(scenario, redis_url)
    assert waits == sorted(waits)  # as if one after the other: each reservation queues behind the ones before
    assert all(w == 0 for w in waits[:9]) and 0 < waits[11] <= 0.03


def test_a_reservation_or_move_that_fails_fails_its_row_only(redis_url):
    """Reservations (and moves) of one loop tick go out as one script call each: a model whose bucket is broken
    (a key of the wrong type) fails its own rows; another model's rows in the same call reserve as ever."""

    async def scenario(client):
        await client.hset("ratelimit:t:broken:requests", "not", "a bucket")
        batcher = RedisBatcher(client, transaction=False)
        good, broken = (
            SharedRateLimiter(client, f"t:{name}", rpm=6000, tpm=None, burst_seconds=0.1, batcher=batcher)
            for name in ("good", "broken")
        )
        reserved = await asyncio.gather(good.acquire(1), broken.acquire(1), good.acquire(1), return_exceptions=True)
        moved = await asyncio.gather(broken.release(1), good.release(1), return_exceptions=True)
        return reserved, moved

    (first, failed, second), (not_moved, moved) = run(scenario, redis_url)
    assert (first, second, moved) == (0, 0, None)
    for error in (failed, not_moved):
        assert isinstance(error, redis.exceptions.ResponseError) and "WRONGTYPE" in str(error)
