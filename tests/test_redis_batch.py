"""The process's shared Redis batches (pipeline.calls.redis_batch) on a real server: rows staged in one loop tick
share a round trip, each row gets its own replies or its own error, and a lost connection is retried."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from pipeline.calls.redis_batch import RedisBatcher

from .conftest import with_async_redis


def run(scenario, redis_url):
    return with_async_redis(scenario, redis_url, retry=Retry(NoBackoff(), 3))  # the workers' client retries too


def test_a_transaction_gives_each_row_its_replies_and_a_failed_command_fails_only_its_row(redis_url):
    async def scenario(client):
        await client.set("text", "not a hash")
        batcher = RedisBatcher(client, transaction=True)
        rows = [
            batcher.run(lambda pipe: (pipe.set("a", "1"), pipe.incr("n"))),
            batcher.run(lambda pipe: pipe.hset("text", "f", "v")),  # WRONGTYPE when applied
            batcher.run(lambda pipe: (pipe.incr("n"), pipe.get("a"))),
        ]
        outcomes = await asyncio.gather(*rows, return_exceptions=True)
        return outcomes, await client.get("n")

    (first, failed, third), counted = run(scenario, redis_url)
    assert first == [b"OK", 1] and third == [2, b"1"]  # raw replies, in order, across rows of one transaction
    assert isinstance(failed, redis.exceptions.ResponseError) and "WRONGTYPE" in str(failed)
    assert counted == b"2"


def test_a_command_refused_when_queued_aborts_the_transaction_for_every_row(redis_url):
    async def scenario(client):
        batcher = RedisBatcher(client, transaction=True)
        rows = [
            batcher.run(lambda pipe: pipe.set("a", "1")),
            batcher.run(lambda pipe: pipe.execute_command("NOSUCHCOMMAND", "x")),
        ]
        outcomes = await asyncio.gather(*rows, return_exceptions=True)
        return outcomes, await client.exists("a")

    outcomes, applied = run(scenario, redis_url)
    assert all(isinstance(o, redis.exceptions.ResponseError) for o in outcomes)
    assert applied == 0  # nothing of the batch was applied


def test_scripts_go_by_their_text_and_a_lost_connection_is_retried(redis_url):
    async def scenario(client):
        batcher = RedisBatcher(client, transaction=False)
        script = client.register_script("return redis.call('INCR', KEYS[1]) + tonumber(ARGV[1])")

        def stage(pipe):
            pipe.eval(script.script, 1, "n", 10)

        first = await batcher.run(stage)
        killer = aioredis.Redis.from_url(redis_url)
        await killer.script_flush()  # the server forgets its scripts (a restart, a failover)
        killed = await killer.client_kill_filter(_type="normal", skipme=True)  # and the batcher's connection is cut
        await killer.aclose()
        second = await batcher.run(stage)
        return first, killed, second

    first, killed, second = run(scenario, redis_url)
    assert killed >= 1 and (first, second) == ([11], [12])


def test_items_merged_into_one_command_each_get_their_element_or_its_error(redis_url):
    script = "local n = {} for i, k in ipairs(KEYS) do n[i] = redis.call('STRLEN', k) end return n"

    def lengths(pipe, keys):  # one command for every item of the flush: a reply with one element each
        pipe.eval(script, len(keys), *keys)

    def refused(pipe, keys):
        pipe.eval("return redis.error_reply('no')", len(keys), *keys)

    async def scenario(client):
        await client.mset({"a": "1", "bb": "22"})
        batcher = RedisBatcher(client, transaction=True)
        rows = [
            batcher.stage_item(lengths, "a"),
            batcher.run(lambda pipe: pipe.incr("n")),  # a row's own commands in the same flush
            batcher.stage_item(lengths, "bb"),
            batcher.stage_item(refused, "a"),
        ]
        outcomes = await asyncio.gather(*rows, return_exceptions=True)
        later = await batcher.stage_item(lengths, "missing")  # the next flush: a command of its own
        await client.delete("a", "bb", "n")
        return outcomes, later

    (first, own, second, failed), later = run(scenario, redis_url)
    assert (first, own, second, later) == (1, [1], 2, 0)
    assert isinstance(failed, redis.exceptions.ResponseError) and "no" in str(failed)
