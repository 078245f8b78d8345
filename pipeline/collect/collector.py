"""The collector: the only writer to SQL. Reads the hand-over stream, upserts in batches, acknowledges after commit.

Run it as ``python -m pipeline.collect.collector`` (``--burst`` to drain and exit) or through ``enqueue.py collect``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from pipeline import handoff
from pipeline.collect import store, writes
from pipeline.control import runstate
from pipeline.handoff import Entry, ResultRows, StreamReader, UnreadableEntry
from pipeline.records import FAILED, RunConfig
from pipeline.redaction import redact
from pipeline.settings import Settings

log = logging.getLogger("pipeline.collector")
CONSUMER_SWEEP_SECONDS = 600  # how often a running collector looks for idle consumers of the group
Decoded = ResultRows | RunConfig | dict[str, Any]

Observer = Callable[["BatchOutcome", writes.Applied], None]

# Fields a database may refuse in a result (too long, NULL where it needs a value), with what replaces them,
# and the order they are tried in: each alone first, the input last, then all of them at once.
_EMPTY: dict[str, Any] = {
    "model": None,
    "answer": None,
    "parsed": None,
    "provider": None,
    "prompt_hash": "",
    "input": {},
}
_DROP_ORDER = [(name,) for name in _EMPTY] + [tuple(_EMPTY)]


@dataclass
class BatchOutcome:
    entries: int
    results_written: int
    runs_finished: list[str]
    parked: int = 0
    configs: list[RunConfig] = field(default_factory=list)  # run events in this batch (metrics label sets)


class Collector:
    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        engine: Engine,
        observers: list[Observer] | None = None,
        consumer: str | None = None,
    ) -> None:
        """``consumer`` names this reader in the stream's group: two collectors running at once need two names
        (a restarted one takes its old name back, and with it what it had read but not written)."""
        self.settings = settings
        self.engine = engine
        self.connection = connection
        self.reader = StreamReader(connection, settings.result_stream, consumer, parked_max=settings.parked_max_entries)
        self.observers = list(observers or [])
        self._parked = 0
        self._prepared = False
        # A stream entry holds one result or many (handoff.ENTRY_RESULTS at most): the next read asks for as many
        # entries as, at the last batch's results per entry, make about COLLECTOR_BATCH results.
        self._entries_per_batch = max(1, settings.collector_batch // handoff.ENTRY_RESULTS)

    def step(self, block_ms: int | None = 1000) -> BatchOutcome:
        """Read one batch, write it in one transaction, then acknowledge it.

        A batch that the database rejects for its content (not for being down) is written entry by entry,
        so that one unstorable result cannot hold up the others.
        """
        entries = self._read_batch(block_ms)
        if not entries:
            return BatchOutcome(0, 0, [])
        self._parked = 0
        readable = self._readable(entries)
        records = sum(len(record.rows) if isinstance(record, ResultRows) else 1 for _, record in readable)
        self._entries_per_batch = max(1, self.settings.collector_batch * len(entries) // max(1, records))
        try:
            with store.writing(self.engine) as conn:
                applied, finished = self._write(conn, readable)
        except DBAPIError as exc:
            if is_outage(exc):
                raise
            applied, finished = self._write_one_by_one(readable)
        self.reader.ack(entries)
        self._retain(readable, finished)
        configs = [record for _, record in readable if isinstance(record, RunConfig)]
        outcome = BatchOutcome(len(entries), len(applied.changed), finished, self._parked, configs)
        for observer in self.observers:
            observer(outcome, applied)
        return outcome

    def _read_batch(self, block_ms: int | None) -> list[Entry]:
        """A batch of entries; when results trickle in, it waits COLLECTOR_LINGER_MS once for more, since a
        transaction's own statements (run totals, the completion check, the commit) cost as much as dozens of
        results' rows."""
        wanted = self._entries_per_batch
        entries = self.reader.read(wanted, block_ms)
        if entries and len(entries) < wanted // 2 and self.settings.collector_linger_ms:
            time.sleep(self.settings.collector_linger_ms / 1000)
            entries += self.reader.read_new(wanted - len(entries))
        return entries

    def _retain(self, entries: list[tuple[Entry, Decoded]], finished: list[str]) -> None:
        """A run that became final gets its Redis keys' expiry (RUN_RETENTION_SECONDS); one that runs again
        (resume, retry-failed: a "running" event) keeps them. In stream order: the last word wins."""
        final = {}
        for entry, record in entries:
            if entry.kind == handoff.STATUS and isinstance(record, dict):
                final[record["run_id"]] = record["status"] in store.FINAL_STATUSES
        final.update(dict.fromkeys(finished, True))
        for run_id, is_final in final.items():
            if is_final:
                runstate.expire_run(self.connection, run_id, self.settings.run_retention_seconds)
            else:
                runstate.keep_run(self.connection, run_id)

    def _sweep_consumers(self) -> None:
        removed = self.reader.remove_idle_consumers(int(self.settings.consumer_idle_seconds * 1000))
        if removed:
            log.info("removed %d idle consumer(s) from the result stream's group", removed)

    def _prepare(self) -> None:
        """Create the tables once the database answers (raises DBAPIError until then)."""
        if not self._prepared:
            store.prepare(self.engine)
            self._prepared = True

    def _readable(self, entries: list[Entry]) -> list[tuple[Entry, Decoded]]:
        """Entries with what they say; one that cannot be read (a newer worker's change that this version cannot
        take, a damaged entry) is parked, so that it cannot stop the others, now or after a restart."""
        readable: list[tuple[Entry, Decoded]] = []
        for entry in entries:
            if entry.kind == handoff.RESULTS and not entry.problem:
                results, unreadable = handoff.read_results(entry)
                for part, reason in unreadable:
                    self._park(part, reason)
                if results.rows:
                    readable.append((entry, results))
                continue
            try:
                readable.append((entry, handoff.decode(entry)))
            except UnreadableEntry as exc:
                self._park(entry, str(exc))
        return readable

    def _write(self, conn, entries: list[tuple[Entry, Decoded]]) -> tuple[writes.Applied, list[str]]:
        """Apply entries in stream order: a run's events and its results may share a batch."""
        applied, touched, rows = writes.Applied(), set(), []
        for entry, record in entries:
            if isinstance(record, ResultRows):
                rows += record.rows
                continue
            applied.add(writes.apply_rows(conn, rows))
            rows = []
            self._apply_event(conn, entry.kind, record)
            touched.add(entry.data["run_id"])
        applied.add(writes.apply_rows(conn, rows))
        return applied, writes.finish_complete_runs(conn, touched | applied.runs)

    @staticmethod
    def _apply_event(conn, kind: str, record: Decoded) -> None:
        if isinstance(record, RunConfig):
            writes.save_run(conn, record, "submitted")
        elif kind == handoff.STATUS and isinstance(record, dict):
            config = record.get("config")
            writes.set_run_status(
                conn, record["run_id"], record["status"], config=RunConfig.from_dict(config) if config else None
            )
            if record.get("retrying"):
                writes.reopen_failed(
                    conn, record["run_id"], record["retrying"], before=record["at"], generation=record.get("generation")
                )
        elif kind == handoff.BATCH and isinstance(record, dict):
            writes.save_batch(conn, record)

    def _park(self, entry: Entry, reason: str) -> None:
        self.reader.park(entry, reason)
        self._parked += 1
        log.error("parked an entry of run %s in %s: %s", entry.data.get("run_id"), self.reader.parked_stream, reason)

    def _write_one_by_one(self, entries: list[tuple[Entry, Decoded]]) -> tuple[writes.Applied, list[str]]:
        applied, finished = writes.Applied(), []
        for entry, record in _one_at_a_time(entries):
            try:
                with store.writing(self.engine) as conn:
                    one, done = self._write(conn, [(entry, record)])
            except DBAPIError as exc:
                if is_outage(exc):
                    raise
                one, done = self._store_as_failure(entry, record, exc)
            applied.add(one)
            finished += done
        return applied, finished

    def _store_as_failure(self, entry: Entry, record: Decoded, exc: DBAPIError) -> tuple[writes.Applied, list[str]]:
        """The row still gets its one result: failed, saying why its answer could not be stored and which field
        was dropped. The database does not say which field it refused, so the fields are dropped one at a time
        until it takes the result: its input survives (retry-failed renders the template from it) unless the
        input itself is what it refused."""
        cause = exc.orig or exc
        reason = f"{type(cause).__name__}: {str(cause).splitlines()[0]}"
        log.error("database refused an entry of run %s: %s", entry.data.get("run_id"), reason)
        if not isinstance(record, ResultRows):
            self._park(entry, reason)
            return writes.Applied(), []
        error = redact(f"the answer could not be stored ({reason})")[:1900]
        for dropped in _DROP_ORDER:
            failure = {
                **record.rows[0],
                "status": FAILED,
                "error": f"{error}; dropped: {', '.join(dropped)}",
                **{name: _EMPTY[name] for name in dropped},
            }
            try:
                with store.writing(self.engine) as conn:
                    return self._write(conn, [(entry, ResultRows([failure], record.sent))])
            except DBAPIError as again:
                if is_outage(again):
                    raise
        self._park(entry, reason)
        return writes.Applied(), []

    def run(self, *, burst: bool = False, stop: Callable[[], bool] | None = None) -> int:
        """Loop until stopped; with ``burst``, until the stream is empty. Survives a database outage, one at
        start included: results wait in Redis until the database answers."""
        written, delay, swept = 0, 0.5, float("-inf")
        while stop is None or not stop():
            if time.monotonic() - swept >= CONSUMER_SWEEP_SECONDS:
                self._sweep_consumers()
                swept = time.monotonic()
            try:
                self._prepare()
                outcome = self.step(block_ms=200 if burst else 1000)
                delay = 0.5
            except DBAPIError as exc:
                log.warning("database unavailable, results stay in Redis: %s", type(exc).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            written += outcome.results_written
            for run_id in outcome.runs_finished:
                log.info("run finished", extra={"run_id": run_id})
            if burst and outcome.entries == 0 and self.reader.backlog() == 0:
                self.reader.remove_idle_consumers(0, only=self.reader.consumer)  # a burst leaves no consumer
                break
        return written


def _one_at_a_time(entries: list[tuple[Entry, Decoded]]) -> Iterator[tuple[Entry, Decoded]]:
    """The entries with each result on its own, as a ``result`` entry of the data it came as."""
    for entry, record in entries:
        if isinstance(record, ResultRows):
            for row, sent in zip(record.rows, record.sent):
                yield Entry(entry.id, handoff.RESULT, sent), ResultRows([row], [sent])
        else:
            yield entry, record


def is_outage(exc: DBAPIError) -> bool:
    """Anything but a refusal of this content (bad data, a broken constraint) is the database's problem, not the
    entry's: down, read-only after a failover, permissions, a missing table. Those are retried, never dropped."""
    return exc.connection_invalidated or not isinstance(exc, (DataError, IntegrityError))


def main(argv: list[str] | None = None) -> None:
    import argparse

    from pipeline.logs import setup_logging
    from pipeline.settings import load_settings

    parser = argparse.ArgumentParser(description="Write worker results to SQL and serve /metrics.")
    parser.add_argument("--burst", action="store_true", help="drain the stream, then exit")
    args = parser.parse_args(argv)
    settings = load_settings()
    setup_logging(settings, "collector")
    serve_collector(settings, burst=args.burst)


def serve_collector(settings: Settings, *, burst: bool = False, metrics_port: int | None = None) -> int:
    """The collector process: /metrics on METRICS_HOST:METRICS_PORT (port 0 = none) and the write loop. It starts
    whether or not the database answers: /metrics is served from the start, the tables are made once it does."""
    from pipeline.collect.metrics import PipelineMetrics
    from pipeline.queue import connect

    connection = connect(settings)
    engine = store.open_engine(settings.resolved_database_url)
    metrics = PipelineMetrics(settings, connection, engine)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(port, addr=settings.metrics_host)[0] if port else None
    if server is not None:
        log.info("serving /metrics on %s:%d", settings.metrics_host, server.server_port)
    try:
        return Collector(settings, connection, engine, observers=[metrics.observe]).run(burst=burst)
    finally:
        if server is not None:
            server.shutdown()


if __name__ == "__main__":
    main()
