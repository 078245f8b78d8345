"""The collector: the only writer to SQL. Reads the hand-over stream, upserts in batches, acknowledges after commit.

Run it as ``python -m pipeline.collector`` (``--burst`` to drain and exit) or through ``enqueue.py collect``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from . import handoff, store
from .handoff import Entry, StreamReader
from .records import Result, RunConfig
from .settings import Settings

log = logging.getLogger("pipeline.collector")

Observer = Callable[[store.Applied, list[str]], None]


@dataclass
class BatchOutcome:
    entries: int
    results_written: int
    runs_finished: list[str]


class Collector:
    def __init__(self, settings: Settings, connection: redis.Redis, engine: Engine,
                 observers: list[Observer] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.reader = StreamReader(connection, settings.result_stream)
        self.observers = list(observers or [])

    def step(self, block_ms: int | None = 1000) -> BatchOutcome:
        """Read one batch, write it in one transaction, then acknowledge it."""
        entries = self.reader.read(self.settings.collector_batch, block_ms)
        if not entries:
            return BatchOutcome(0, 0, [])
        with self.engine.begin() as conn:
            applied, finished = self._write(conn, entries)
        self.reader.ack(entries)
        for observer in self.observers:
            observer(applied, finished)
        return BatchOutcome(len(entries), len(applied.changed), finished)

    def _write(self, conn, entries: list[Entry]) -> tuple[store.Applied, list[str]]:
        touched: set[str] = set()
        for entry in entries:
            if entry.kind == handoff.RUN:
                store.save_run(conn, RunConfig.from_dict(entry.data), "submitted")
                touched.add(entry.data["run_id"])
        results = [Result(**e.data) for e in entries if e.kind == handoff.RESULT]
        applied = store.apply_results(conn, results)
        touched |= applied.runs
        for entry in entries:
            if entry.kind == handoff.STATUS:
                config = entry.data.get("config")
                store.set_run_status(conn, entry.data["run_id"], entry.data["status"],
                                     config=RunConfig.from_dict(config) if config else None)
                touched.add(entry.data["run_id"])
        return applied, store.finish_complete_runs(conn, touched)

    def run(self, *, burst: bool = False, stop: Callable[[], bool] | None = None) -> int:
        """Loop until stopped; with ``burst``, until the stream is empty. Survives a database outage."""
        written, delay = 0, 0.5
        while stop is None or not stop():
            try:
                outcome = self.step(block_ms=200 if burst else 1000)
                delay = 0.5
            except (OperationalError, DBAPIError) as exc:
                log.warning("database unavailable, results stay in Redis: %s", type(exc).__name__)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            written += outcome.results_written
            for run_id in outcome.runs_finished:
                log.info("run finished", extra={"run_id": run_id})
            if burst and outcome.entries == 0 and self.reader.backlog() == 0:
                break
        return written


def main(argv: list[str] | None = None) -> None:
    import argparse

    from .logs import setup_logging
    from .settings import load_settings

    parser = argparse.ArgumentParser(description="Write worker results to SQL and serve /metrics.")
    parser.add_argument("--burst", action="store_true", help="drain the stream, then exit")
    args = parser.parse_args(argv)
    settings = load_settings()
    setup_logging(settings, "collector")
    serve_collector(settings, burst=args.burst)


def serve_collector(settings: Settings, *, burst: bool = False, metrics_port: int | None = None) -> int:
    """The collector process: /metrics on METRICS_PORT (0 = none) and the write loop."""
    from .metrics import PipelineMetrics
    from .queue import connect

    connection = connect(settings)
    engine = store.make_engine(settings.resolved_database_url)
    metrics = PipelineMetrics(settings, connection, engine)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(port)[0] if port else None
    if server is not None:
        log.info("serving /metrics on port %d", server.server_port)
    try:
        return Collector(settings, connection, engine, observers=[metrics.observe]).run(burst=burst)
    finally:
        if server is not None:
            server.shutdown()


if __name__ == "__main__":
    main()
