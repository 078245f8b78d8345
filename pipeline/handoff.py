"""The hand-over from workers to the collector: one Redis stream, read through a consumer group.

Workers append each result the moment it is known (so a killed worker loses no paid answer) and mark the row
done for its run in the same transaction. Results known in the same loop tick share one ``results`` entry (up
to ENTRY_RESULTS): per result, an entry of its own cost the collector more to read (the reply parsed, the JSON
decoded, the entry acknowledged and deleted) than its SQL write. The collector acknowledges entries only after
its SQL commit, so a collector crash means redelivery, which the idempotent upsert absorbs.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis
import redis.asyncio as aioredis

from pipeline.calls.redis_batch import RedisBatcher
from pipeline.records import STOPPED, Result, RunConfig, result_fields

GROUP = "collector"
RESULT = "result"  # one result (workers before the ``results`` entry; a parked result)
RESULTS = "results"  # several results: {"results": [result, ...]}
ENTRY_RESULTS = 200  # results per ``results`` entry at most (about 200 kB)
CLAIM_EVERY_SECONDS = 1.0  # how often a reader looks for entries a dead consumer left (idle past claim_idle_ms)
RUN = "run"  # a run was submitted: payload is its RunConfig
STATUS = "status"  # a run changed status (cancelled, budget exhausted, resumed)
BATCH = "batch"  # batch mode: a chunk's batch intent, its provider batch id, its state


def done_key(run_id: str) -> str:
    """Hash of row key -> status for rows whose result was handed over (lets a re-run chunk skip them)."""
    return f"run:{run_id}:done"


def is_done(status: bytes | str | None) -> bool:
    """Whether a row's done mark means it needs no more answers: a ``stopped`` row (cut short by a budget stop or
    a cancel, its billed answers handed over) is asked again by resume."""
    if isinstance(status, bytes):
        status = status.decode()
    return status is not None and status != STOPPED


def waiting_key(stream: str) -> str:
    """How many results and events are on the stream, not yet written: each entry says how many it holds ("n"),
    added here as it goes on the stream and taken off when the collector acknowledges it."""
    return f"{stream}:waiting"


def waiting(client: redis.Redis, stream: str) -> int:
    """Results and events on the stream not yet written to SQL (entries of workers older than the count are not
    in it)."""
    return max(0, int(cast(bytes | None, client.get(waiting_key(stream))) or 0))


def stage_entry(pipe: Any, stream: str, kind: str, data: str | bytes, size: int = 1) -> None:
    pipe.xadd(stream, {"kind": kind, "data": data, "n": size})
    pipe.incrby(waiting_key(stream), size)


def stage_results(pipe: Any, stream: str, results: Sequence[Result]) -> None:
    """Queue results' hand-over on a (transactional) pipeline: their stream entries and their rows' done marks."""
    for start in range(0, len(results), ENTRY_RESULTS):
        part = results[start : start + ENTRY_RESULTS]
        stage_entry(pipe, stream, RESULTS, b'{"results":[' + b",".join(r.encoded() for r in part) + b"]}", len(part))
    marks: dict[str, dict[str, str]] = {}
    for result in results:
        if result.status == STOPPED:  # never over another worker's answer to the same row
            pipe.hsetnx(done_key(result.run_id), result.row_key, result.status)
        else:
            marks.setdefault(result.run_id, {})[result.row_key] = result.status
    for run_id, mapping in marks.items():
        pipe.hset(done_key(run_id), mapping=mapping)


async def publish_results_async(client: aioredis.Redis, stream: str, results: Sequence[Result]) -> None:
    async with client.pipeline(transaction=True) as pipe:
        stage_results(pipe, stream, results)
        await pipe.execute()


def publish_results(client: redis.Redis, stream: str, results: Sequence[Result]) -> None:
    """Hand over several results at once (from synchronous code: a failed chunk's rows)."""
    if results:
        with client.pipeline(transaction=True) as pipe:
            stage_results(pipe, stream, results)
            pipe.execute()


class HandOver:
    """A worker process's hand-over: the results its rows know before the next write goes out share one entry.

    Staged on the process's transactional batcher (pipeline.calls.redis_batch) at the moment it flushes, so that
    results arriving while a flush is in flight wait for the next one together instead of one entry each, and go
    in the same transaction as the answers the response cache stores in that tick."""

    def __init__(self, writes: RedisBatcher, stream: str) -> None:
        self._writes = writes
        self._stream = stream
        self._waiting: list[Result] = []
        self._sending: asyncio.Future[list[Any]] | None = None

    async def put(self, result: Result) -> None:
        """Returns once the result is on the stream with its row's done mark; raises if that failed."""
        if self._sending is not None and self._sending.done():  # failed before it was staged: its rows saw why
            self._sending, self._waiting = None, []
        self._waiting.append(result)
        if self._sending is None:
            self._sending = self._writes.stage(self._stage_waiting)
        await asyncio.shield(self._sending)

    def _stage_waiting(self, pipe: Any) -> None:
        results, self._waiting, self._sending = self._waiting, [], None
        stage_results(pipe, self._stream, results)


def publish_event(client: redis.Redis, stream: str, kind: str, payload: dict[str, Any]) -> None:
    with client.pipeline(transaction=True) as pipe:
        stage_entry(pipe, stream, kind, json.dumps(payload, ensure_ascii=False, default=str))
        pipe.execute()


async def publish_event_async(client: aioredis.Redis, stream: str, kind: str, payload: dict[str, Any]) -> None:
    async with client.pipeline(transaction=True) as pipe:
        stage_entry(pipe, stream, kind, json.dumps(payload, ensure_ascii=False, default=str))
        await pipe.execute()


@dataclass(frozen=True)
class Entry:
    id: bytes
    kind: str
    data: dict[str, Any]
    problem: str | None = None  # why the entry could not be read (its data is then {"raw": the text})
    size: int = 0  # results or events it holds, as counted in waiting_key (0: a worker older than the count)


class UnreadableEntry(ValueError):
    """An entry no version of the collector can write: it is parked with this reason."""


def decode(entry: Entry) -> ResultRows | RunConfig | dict[str, Any]:
    """What an entry says, checked: its result (a ``result`` entry), a RunConfig, or an event's fields. A
    ``results`` entry is read by ``read_results``."""
    if entry.problem:
        raise UnreadableEntry(entry.problem)
    data = entry.data
    try:
        if entry.kind == RESULT:
            return ResultRows([result_fields(data)], [data])
        if entry.kind == RUN:
            config = RunConfig.from_dict(data)
            if not isinstance(config.run_id, str) or not isinstance(config.total_rows, int):
                raise ValueError("run_id must be text and total_rows an integer")
            return config
        if entry.kind == STATUS:
            return _status_event(data)
        if entry.kind == BATCH:
            return _batch_event(data)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UnreadableEntry(f"not a valid {entry.kind} entry: {exc}") from None
    raise UnreadableEntry(f"unknown entry kind {entry.kind!r}")


@dataclass
class ResultRows:
    """An entry's readable results, in order, ready for SQL: each one's fields (a Result's, which are the results
    table's columns), checked, beside the data it came as (parked if the database refuses it even as a failure).
    The collector writes these without making a Result of each: a Result, an Entry and a row copied from the
    Result for every result, and the garbage collections all those objects set off, were about a third of its
    CPU per result."""

    rows: list[dict[str, Any]]
    sent: list[dict[str, Any]]


def read_results(entry: Entry) -> tuple[ResultRows, list[tuple[Entry, str]]]:
    """What a readable ``results`` entry holds: its readable results, and each part that cannot be read as an
    entry of its own with why (parked alone: the others are written)."""
    items = entry.data.get("results")
    if not isinstance(items, list):
        return ResultRows([], []), [(entry, "results is not a list")]
    rows: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    unreadable = []
    for item in items:
        try:
            rows.append(result_fields(item))
        except (TypeError, ValueError, AttributeError) as exc:
            unreadable.append(_unreadable_result(entry.id, item, exc))
        else:
            sent.append(item)
    return ResultRows(rows, sent), unreadable


def _unreadable_result(entry_id: bytes, item: Any, exc: Exception) -> tuple[Entry, str]:
    if not isinstance(item, dict):
        problem = "a result is not a JSON object"
        return Entry(entry_id, RESULT, {"raw": item}, problem=problem), problem
    return Entry(entry_id, RESULT, item), f"not a valid {RESULT} entry: {exc}"


def _status_event(data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data.get("run_id"), str) or not isinstance(data.get("status"), str):
        raise ValueError("run_id and status must be text")
    retrying = data.get("retrying")
    if retrying is not None and (not isinstance(retrying, list) or not isinstance(data.get("at"), (int, float))):
        raise ValueError("retrying must be a list of row keys, with its time in 'at'")
    generation = data.get("generation")
    if generation is not None and (not isinstance(generation, int) or isinstance(generation, bool)):
        raise ValueError("generation must be an integer")
    if data.get("config") is not None:
        RunConfig.from_dict(data["config"])
    return data


def _batch_event(data: dict[str, Any]) -> dict[str, Any]:
    if not all(isinstance(data.get(k), str) for k in ("run_id", "chunk", "provider", "state")):
        raise ValueError("run_id, chunk, provider and state must be text")
    if not isinstance(data.get("round"), int) or isinstance(data.get("round"), bool):
        raise ValueError("round must be an integer")
    if data.get("batch_id") is not None and not isinstance(data["batch_id"], str):
        raise ValueError("batch_id must be text")
    if data.get("at") is not None and not isinstance(data["at"], (int, float)):
        raise ValueError("at must be a time")
    return data


ParkedEntries = list[tuple[bytes, dict[bytes, bytes]]]

# KEYS: stream, its waiting count. ARGV: group, then each entry's id and size. Acknowledges and deletes each
# entry, and takes off the count only what this call acknowledged (another collector may have done it first).
_ACK = """
local acked = 0
for i = 2, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    acked = acked + tonumber(ARGV[i + 1])
  end
  redis.call('XDEL', KEYS[1], ARGV[i])
end
if acked > 0 then redis.call('DECRBY', KEYS[2], acked) end
return acked
"""


# KEYS: stream. ARGV: group, minimum idle ms, only this consumer ("" = any). Returns consumers removed.
_REMOVE_IDLE = """
local removed = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #fields, 2 do c[fields[i]] = fields[i + 1] end
  if c['pending'] == 0 and c['idle'] >= tonumber(ARGV[2]) and (ARGV[3] == '' or c['name'] == ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    removed = removed + 1
  end
end
return removed
"""


class StreamReader:
    """The collector's side of the stream: pending entries first (after a restart), then new ones."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        consumer: str | None = None,
        claim_idle_ms: int = 60_000,
        parked_max: int = 10_000,
    ) -> None:
        self.client = client
        self.stream = stream
        self.consumer = consumer or f"{socket.gethostname()}-collector"
        self.claim_idle_ms = claim_idle_ms
        self.parked_max = parked_max
        self._unacked = True  # entries read before a restart come first
        self._from_pending = False
        self._next_claim = float("-inf")
        self._ack_script = client.register_script(_ACK)
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """Entries this consumer or a dead one left unacknowledged, else new entries (blocking up to block_ms)."""
        try:
            return self._read(count, block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group()  # the group is gone if Redis restarted without persistence
            return self._read(count, block_ms)

    def _read(self, count: int, block_ms: int | None) -> list[Entry]:
        # Each look costs a round trip, so each is made only when it can find something: this consumer's own
        # pending entries after a start or a batch it did not acknowledge (its write failed), a dead consumer's
        # every CLAIM_EVERY_SECONDS (and again at once while that finds some).
        if self._unacked:
            pending = self._read_from("0", count, None)
            if pending:
                self._from_pending = True
                return pending
            self._unacked = False
        self._from_pending = False
        if time.monotonic() >= self._next_claim:
            claimed = self.client.xautoclaim(self.stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count)
            entries = [e for e in (self._entry(i, f) for i, f in claimed[1] if f) if e]
            if entries:
                self._unacked = True
                return entries
            self._next_claim = time.monotonic() + CLAIM_EVERY_SECONDS
        entries = self._read_from(">", count, block_ms)
        self._unacked = bool(entries)
        return entries

    def read_new(self, count: int) -> list[Entry]:
        """Entries no consumer has read yet, without waiting (more for a batch already read)."""
        return self._read_from(">", count, None)

    def _read_from(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = self.client.xreadgroup(GROUP, self.consumer, {self.stream: start}, count=count, block=block_ms)
        if not reply:
            return []
        return [e for e in (self._entry(i, f) for i, f in reply[0][1]) if e]

    @staticmethod
    def _entry(entry_id: bytes, fields: dict[bytes, bytes] | None) -> Entry | None:
        if not fields:
            return None
        kind = fields.get(b"kind", b"").decode("utf-8", "replace")
        raw = fields.get(b"data", b"")
        size = int(n) if (n := fields.get(b"n", b"0")).isdigit() else 0
        try:
            data = _loads(raw)
        except ValueError as exc:
            text = raw.decode("utf-8", "replace")
            return Entry(entry_id, kind, {"raw": text}, problem=f"data is not JSON ({exc})", size=size)
        if not isinstance(data, dict):
            text = raw.decode("utf-8", "replace")
            return Entry(entry_id, kind, {"raw": text}, problem="data is not a JSON object", size=size)
        return Entry(entry_id, kind, data, size=size)

    @property
    def parked_stream(self) -> str:
        return f"{self.stream}:parked"

    def park(self, entry: Entry, reason: str) -> None:
        """Keep an entry that cannot be written (unreadable, or refused by the database even as a failure) for a
        person to look at; it is acknowledged next."""
        self.client.xadd(
            self.parked_stream,
            {"kind": entry.kind, "data": json.dumps(entry.data, default=str), "reason": reason},
            maxlen=self.parked_max,
            approximate=True,
        )

    def remove_idle_consumers(self, idle_ms: int, only: str | None = None) -> int:
        """Drop consumers of the group idle at least ``idle_ms`` with nothing pending (``only``: just that one).
        A consumer with pending entries is kept: dropping it would drop them too; XAUTOCLAIM takes them over
        first. Checked and dropped in one script, so a consumer cannot read between the two."""
        try:
            return int(self.client.eval(_REMOVE_IDLE, 1, self.stream, GROUP, idle_ms, only or ""))
        except redis.ResponseError:  # no stream or group (Redis lost its data): nothing to remove
            return 0

    def ack(self, entries: Iterable[Entry]) -> None:
        args = [value for e in entries for value in (e.id, e.size)]
        if args:
            self._ack_script(keys=[self.stream, waiting_key(self.stream)], args=[GROUP, *args])
        if not self._from_pending:  # a batch of pending entries may have left more of them
            self._unacked = False

    def replay_parked(self, batch: int = 500) -> int:
        """Put every parked entry back on the stream for the collectors to write again (after the fix for why it
        was parked: an older collector parked a newer worker's ``results`` entry in a deploy done out of order,
        a column widened). Each moves in one transaction; the upsert absorbs a result already written. An entry
        that still cannot be written is parked again. Returns the entries moved."""
        moved, after = 0, "-"
        while entries := cast(ParkedEntries, self.client.xrange(self.parked_stream, after, "+", count=batch)):
            with self.client.pipeline(transaction=True) as pipe:
                for entry_id, fields in entries:
                    kind, data = fields.get(b"kind", b"").decode(), fields.get(b"data", b"")
                    stage_entry(pipe, self.stream, kind, data, _size(kind, data))
                    pipe.xdel(self.parked_stream, entry_id)
                pipe.execute()
            moved += len(entries)
            after = "(" + entries[-1][0].decode()
        return moved

    def backlog(self) -> int:
        """Entries not yet written to SQL: acknowledged entries are deleted, so this is the stream's length."""
        return int(self.client.xlen(self.stream))


def _loads(raw: bytes) -> Any:
    """JSON as ``json.loads`` reads the text (invalid UTF-8 replaced), by orjson (a third of the CPU, straight
    from the bytes) where it can: it refuses what Python's reader takes (NaN, Infinity, integers past 64 bits,
    invalid UTF-8), which is then read by ``json.loads``."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw.decode("utf-8", "replace"))


def _size(kind: str, data: bytes) -> int:
    """What a parked entry holds (a parked entry has lost its size): a ``results`` entry's results, else one."""
    if kind == RESULTS:
        try:
            results = json.loads(data).get("results")
        except (ValueError, AttributeError):
            return 1
        return len(results) if isinstance(results, list) else 1
    return 1
