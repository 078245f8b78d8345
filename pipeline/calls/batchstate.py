"""Batch mode's state in Redis: one record per batch slot (a chunk's round), the run's slots, the open batches
(for status and metrics), and each model's enqueued tokens.

A slot is ``RUN:CHUNK:rROUND``: round 1 holds the chunk's rows that the cache did not answer, round n+1 only the
items of round n that errored or expired. Its record is written (the *intent*) before the provider's batch is
created, and the batch id right after, so a job that runs the slot again finds the batch instead of paying for a
second one (see ``pipeline.calls.batches``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from pipeline.queue import decoded

OPEN = "batches:open"  # zset: slot -> created_at, for batches created and not ended
EXPIRY = "batches:expiry"  # zset: slot -> provider's expires_at, same members
ENDED = "batches:ended"  # hash: final state -> batches that ended so (all runs, for metrics)
BATCH_IDS = "batches:ids"  # hash: provider batch id -> slot (a found batch must not be another slot's)
ENQUEUED = "batches:enqueued"  # hash: provider:model -> tokens (input + max output) in open batches


def slot_id(run_id: str, chunk: str, round_no: int) -> str:
    return f"{run_id}:{chunk}:r{round_no}"


def record_key(slot: str) -> str:
    return f"batch:{slot}"


def run_slots_key(run_id: str) -> str:
    return f"run:{run_id}:batches"


@dataclass
class Item:
    """One request of a batch: the rows it answers (rows of one chunk with the same prompt share a request)."""

    custom_id: str
    rows: list[dict[str, Any]]  # {"key", "index", "values"}
    prompt: str
    prompt_hash: str
    cache_key: str
    worst_case_nano: int = 0
    tokens: int = 0  # input estimate + max output: what the enqueued-token limit counts

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class SlotRecord:
    slot: str
    run_id: str
    chunk: str
    round: int
    items: list[Item]
    state: str = "intent"  # intent, then the provider state (pipeline.providers.batches.STATES)
    attempt: int = 1  # a batch refused for the enqueued-token limit is made again as attempt + 1
    intent_at: float = 0.0
    batch_id: str | None = None
    created_at: float | None = None
    expires_at: float | None = None
    polls: int = 0
    done: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def provider_chunk_id(self) -> str:
        """What the provider's batch carries (OpenAI metadata ``chunk_id``) to be found again."""
        return f"{self.slot}:a{self.attempt}"


def save_intent(connection: redis.Redis, record: SlotRecord) -> bool:
    """Write a new slot's record, unless it exists already (another job made it first). True if written."""
    key = record_key(record.slot)
    values: dict[Any, Any] = {  # (redis-py types hset's mapping keys as an invariant union)
        "run_id": record.run_id,
        "chunk": record.chunk,
        "round": record.round,
        "state": record.state,
        "attempt": record.attempt,
        "intent_at": record.intent_at,
        "items": json.dumps([i.to_dict() for i in record.items], ensure_ascii=False),
        "polls": 0,
    }
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                if pipe.exists(key):
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.hset(key, mapping=values)
                pipe.sadd(run_slots_key(record.run_id), record.slot)
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def load(connection: redis.Redis, slot: str) -> SlotRecord | None:
    raw = {decoded(k): decoded(v) for k, v in connection.hgetall(record_key(slot)).items()}
    if not raw:
        return None
    return SlotRecord(
        slot=slot,
        run_id=raw["run_id"],
        chunk=raw["chunk"],
        round=int(raw["round"]),
        items=[Item(**i) for i in json.loads(raw["items"])],
        state=raw["state"],
        attempt=int(raw["attempt"]),
        intent_at=float(raw["intent_at"]),
        batch_id=raw.get("batch_id") or None,
        created_at=float(raw["created_at"]) if raw.get("created_at") else None,
        expires_at=float(raw["expires_at"]) if raw.get("expires_at") else None,
        polls=int(raw.get("polls", 0)),
        done=raw.get("done") == "1",
        extra={k: v for k, v in raw.items() if k in ("hold", "enqueued", "cancel_sent", "creating")},
    )


def record_batch(
    connection: redis.Redis, record: SlotRecord, batch_id: str, created_at: float, expires_at: float | None, state: str
) -> None:
    """The provider made the batch: its id goes into the slot's record at once."""
    record.batch_id, record.created_at, record.expires_at, record.state = batch_id, created_at, expires_at, state
    with connection.pipeline(transaction=True) as pipe:
        pipe.hset(
            record_key(record.slot),
            mapping={"batch_id": batch_id, "created_at": created_at, "state": state, "expires_at": expires_at or ""},
        )
        pipe.hset(BATCH_IDS, batch_id, record.slot)
        pipe.zadd(OPEN, {record.slot: created_at})
        if expires_at:
            pipe.zadd(EXPIRY, {record.slot: expires_at})
        pipe.execute()


def set_fields(connection: redis.Redis, slot: str, **values: Any) -> None:
    connection.hset(record_key(slot), mapping={k: ("" if v is None else v) for k, v in values.items()})


def forget_batch(connection: redis.Redis, record: SlotRecord) -> None:
    """A refused batch: the slot makes a new one, as its next attempt."""
    record.attempt += 1
    with connection.pipeline(transaction=True) as pipe:
        pipe.hset(record_key(record.slot), mapping={"batch_id": "", "attempt": record.attempt, "state": "waiting"})
        pipe.zrem(OPEN, record.slot)
        pipe.zrem(EXPIRY, record.slot)
        pipe.execute()
    record.batch_id = None


def finish(connection: redis.Redis, record: SlotRecord, state: str, keep_seconds: int) -> None:
    """The slot is done: its batch ended (or never had to be made). Its record stays ``keep_seconds``."""
    key = record_key(record.slot)
    with connection.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"state": state, "done": "1"})
        pipe.zrem(OPEN, record.slot)
        pipe.zrem(EXPIRY, record.slot)
        if record.batch_id:
            pipe.hincrby(ENDED, state, 1)
        pipe.expire(key, keep_seconds)
        pipe.execute()


def taken_by_another(connection: redis.Redis, slot: str, batch_id: str) -> bool:
    owner = connection.hget(BATCH_IDS, batch_id)
    return owner is not None and decoded(owner) != slot


# KEYS: enqueued hash, record. ARGV: provider:model, tokens, limit (-1 = none). 1 = counted (or was), 0 = over.
_ENQUEUE = """
if redis.call('HEXISTS', KEYS[2], 'enqueued') == 1 then return 1 end
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local tokens, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit >= 0 and current > 0 and current + tokens > limit then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], tokens)
redis.call('HSET', KEYS[2], 'enqueued', ARGV[2])
return 1
"""

# KEYS: enqueued hash, record. ARGV: provider:model. Gives the slot's tokens back once.
_RELEASE = """
local tokens = redis.call('HGET', KEYS[2], 'enqueued')
if not tokens then return 0 end
redis.call('HDEL', KEYS[2], 'enqueued')
redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(tokens))
return 1
"""


# KEYS: record. ARGV: attempt, now, lease end. 0: another job is creating this attempt's batch right now;
# 1: claimed, nothing made before; 2: claimed, but a job that died (or lost the reply) may have made it: look first.
_CLAIM_CREATE = """
local mark = redis.call('HGET', KEYS[1], 'creating')
local verdict = 1
if mark then
  local attempt, lease = string.match(mark, '^(%d+):([%d.]+)$')
  if attempt == ARGV[1] then
    if tonumber(lease) > tonumber(ARGV[2]) then return 0 end
    verdict = 2
  end
end
redis.call('HSET', KEYS[1], 'creating', ARGV[1] .. ':' .. ARGV[3])
return verdict
"""
MAY_EXIST, BUSY = 2, 0


def claim_create(connection: redis.Redis, record: SlotRecord, lease_seconds: float) -> int:
    """Take the right to create the slot's batch for ``lease_seconds`` (the create call's longest life), so two
    jobs on one slot never both create; a lapsed lease of the same attempt means its batch may exist."""
    now = time.time()
    return int(connection.eval(_CLAIM_CREATE, 1, record_key(record.slot), record.attempt, now, now + lease_seconds))


def end_create_lease(connection: redis.Redis, record: SlotRecord) -> None:
    """The create call is over without a recorded id (its reply lost): the next look may search at once."""
    connection.hset(record_key(record.slot), "creating", f"{record.attempt}:0")


def drop_create_claim(connection: redis.Redis, record: SlotRecord) -> None:
    """Nothing was made (refused, or held back before the call): the next attempt creates afresh."""
    connection.hdel(record_key(record.slot), "creating")


def enqueue_tokens(connection: redis.Redis, slot: str, target: str, tokens: int, limit: int | None) -> bool:
    """Count the slot's tokens against its model's open batches, unless that would pass ``limit`` (a batch
    alone over the limit still goes when nothing else is open: it could never go otherwise)."""
    return bool(
        connection.eval(_ENQUEUE, 2, ENQUEUED, record_key(slot), target, tokens, -1 if limit is None else limit)
    )


def release_tokens(connection: redis.Redis, slot: str, target: str) -> None:
    connection.eval(_RELEASE, 2, ENQUEUED, record_key(slot), target)


def take_field(connection: redis.Redis, slot: str, name: str) -> str | None:
    """Remove one field of the record and return what it held, once (a second caller gets None)."""
    with connection.pipeline(transaction=True) as pipe:
        pipe.hget(record_key(slot), name)
        pipe.hdel(record_key(slot), name)
        value, removed = pipe.execute()
    return decoded(value) if removed and value is not None else None


def run_batches(connection: redis.Redis, run_id: str) -> list[SlotRecord]:
    slots = sorted(map(decoded, connection.smembers(run_slots_key(run_id))))
    return [r for r in (load(connection, s) for s in slots) if r is not None]


def _slot_fields(connection: redis.Redis, run_id: str, *names: str) -> list[list[str | None]]:
    """Some fields of every slot of the run, without reading their items (status and resume ask often)."""
    slots = list(map(decoded, connection.smembers(run_slots_key(run_id))))
    with connection.pipeline(transaction=False) as pipe:
        for slot in slots:
            pipe.hmget(record_key(slot), ["run_id", *names])
        rows = pipe.execute()
    return [[v.decode() if v is not None else None for v in row[1:]] for row in rows if row[0] is not None]


def open_batch_count(connection: redis.Redis, run_id: str) -> int:
    """The run's slots not done yet (with a batch, or waiting to make one)."""
    return sum(1 for (done,) in _slot_fields(connection, run_id, "done") if done != "1")


def states(connection: redis.Redis, run_id: str) -> dict[str, int]:
    """The run's batches by state (slots that never made a batch are left out)."""
    counts: dict[str, int] = {}
    for state, batch_id in _slot_fields(connection, run_id, "state", "batch_id"):
        if state and (batch_id or state not in ("intent", "waiting", "skipped")):
            counts[state] = counts.get(state, 0) + 1
    return counts


def open_view(connection: redis.Redis) -> tuple[dict[str, int], float | None, float | None]:
    """For metrics: open batches by state, the oldest one's creation time, the soonest expiry."""
    slots = list(map(decoded, connection.zrange(OPEN, 0, -1)))
    counts: dict[str, int] = {}
    if slots:
        with connection.pipeline(transaction=False) as pipe:
            for slot in slots:
                pipe.hget(record_key(slot), "state")
            for state in pipe.execute():
                name = state.decode() if state else "unknown"
                counts[name] = counts.get(name, 0) + 1
    oldest: Any = connection.zrange(OPEN, 0, 0, withscores=True)
    soonest: Any = connection.zrange(EXPIRY, 0, 0, withscores=True)
    return counts, (float(oldest[0][1]) if oldest else None), (float(soonest[0][1]) if soonest else None)


def ended_counts(connection: redis.Redis) -> dict[str, int]:
    return {decoded(k): int(v) for k, v in connection.hgetall(ENDED).items()}


def now() -> float:
    return time.time()
