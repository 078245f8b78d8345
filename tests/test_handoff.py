"""The workers' side of the hand-over, against a real Redis: results known together share one stream entry,
every row gets its done mark in the same transaction, and a failed write reaches every row that waited on it."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio as aioredis

from pipeline import handoff
from pipeline.calls.redis_batch import RedisBatcher
from pipeline.records import STOPPED, SUCCEEDED, Result

STREAM = "test:handoff"


def result(i: int, status: str = SUCCEEDED) -> Result:
    return Result(run_id="run", row_key=f"r{i}", row_index=i, status=status, input={"i": i}, finished_at=1.0)


def entries(client: redis.Redis) -> list[list[dict]]:
    return [json.loads(fields[b"data"])["results"] for _, fields in client.xrange(STREAM)]


@pytest.fixture
def client(redis_url):
    connection = redis.Redis.from_url(redis_url)
    connection.delete(STREAM, handoff.done_key("run"))
    yield connection
    connection.delete(STREAM, handoff.done_key("run"))
    connection.close()


async def hand_over(url: str, results: list[Result]) -> None:
    async with aioredis.Redis.from_url(url) as aclient:
        hand_over = handoff.HandOver(RedisBatcher(aclient, transaction=True), STREAM)
        await asyncio.gather(*(hand_over.put(r) for r in results))
        await hand_over.put(result(99))  # after the others are out: an entry of its own


def test_results_handed_over_together_share_an_entry_and_each_row_is_marked_done(client, redis_url):
    client.hset(handoff.done_key("run"), "r2", SUCCEEDED)  # another worker's answer to r2 came first
    asyncio.run(hand_over(redis_url, [result(0), result(1), result(2, STOPPED)]))

    assert [[r["row_key"] for r in entry] for entry in entries(client)] == [["r0", "r1", "r2"], ["r99"]]
    done = client.hgetall(handoff.done_key("run"))
    assert done == {b"r0": b"succeeded", b"r1": b"succeeded", b"r2": b"succeeded", b"r99": b"succeeded"}


def test_an_entry_holds_at_most_entry_results(client):
    many = [result(i) for i in range(handoff.ENTRY_RESULTS + 1)]
    handoff.publish_results(client, STREAM, many)
    assert [len(entry) for entry in entries(client)] == [handoff.ENTRY_RESULTS, 1]
    assert client.hlen(handoff.done_key("run")) == handoff.ENTRY_RESULTS + 1


def test_a_failed_hand_over_reaches_every_row_that_waited_and_the_next_one_tries_again():
    class CountedBatcher(RedisBatcher):
        writes = 0

        def stage(self, stage):
            self.writes += 1
            return super().stage(stage)

    async def scenario() -> tuple[list[object], int]:
        closed = aioredis.Redis(host="127.0.0.1", port=1, retry=None)  # nothing listens on port 1
        batcher = CountedBatcher(closed, transaction=True)
        hand_over = handoff.HandOver(batcher, STREAM)
        outcomes = await asyncio.gather(*(hand_over.put(result(i)) for i in range(3)), return_exceptions=True)
        outcomes += await asyncio.gather(hand_over.put(result(3)), return_exceptions=True)  # a write of its own
        return outcomes, batcher.writes

    outcomes, writes = asyncio.run(scenario())
    assert len(outcomes) == 4 and all(isinstance(o, redis.ConnectionError) for o in outcomes) and writes == 2


def test_entries_read_as_json_loads_reads_them():
    """The fast reader refuses NaN and integers past 64 bits; such entries still read as Python's json does."""
    text = json.dumps({"results": [{"parsed": {"score": float("nan"), "id": 2**70}}]})
    entry = handoff.StreamReader._entry(b"1-0", {b"kind": b"results", b"data": text.encode(), b"n": b"1"})
    assert entry is not None and entry.problem is None and entry.size == 1
    parsed = entry.data["results"][0]["parsed"]
    assert parsed["id"] == 2**70 and parsed["score"] != parsed["score"]  # NaN
