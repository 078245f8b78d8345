"""The RQ entry points of batch mode: a chunk becomes a provider batch, and a poll job follows it to its end.

The poll job re-schedules itself (it returns RQ's ``Retry`` with the wait as its interval) until its batch has
ended and been collected, so no worker ever waits for a batch. See ``pipeline.calls.batches``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from rq import Retry, get_current_job
from sqlalchemy import Engine

from pipeline.calls.batches import BatchRunner
from pipeline.collect import store
from pipeline.control import runstate
from pipeline.errors import RunNotFound
from pipeline.queue import connect
from pipeline.records import RunConfig
from pipeline.settings import Settings

from .process_chunk import worker_settings

log = logging.getLogger("pipeline.job")
MAX_POLLS = 100_000  # RQ wants a bound; at BATCH_POLL_MAX_SECONDS apart this is far beyond a batch's 24 h
_engines: dict[str, Engine] = {}  # the worker process's read-only engine, opened by its first batch chunk


def records_engine(settings: Settings) -> Engine:
    """An engine on the results database, for reading the batches it records (the collector writes them)."""
    url = settings.resolved_database_url
    if url not in _engines:
        _engines[url] = store.open_engine(url)
    return _engines[url]


def start_batch_chunk(
    settings: Settings, connection: redis.Redis, config: RunConfig, payload: dict[str, Any]
) -> dict[str, Any]:
    summary = BatchRunner(settings, connection, config, engine=records_engine(settings)).start_chunk(payload)
    log.info("batch chunk started", extra={"run_id": config.run_id, "summary": summary})
    return summary


def poll_batch(payload: dict[str, Any]) -> dict[str, Any] | Retry:
    settings = worker_settings()
    job = get_current_job()
    connection = job.connection if job is not None else connect(settings)
    try:
        config = runstate.load_config(connection, payload["run_id"])
    except RunNotFound:
        log.warning("batch %s: its run's state is gone; nothing to poll", payload["slot"])
        return {"slot": payload["slot"], "done": False, "reason": "run not found"}
    wait = BatchRunner(settings, connection, config).advance(payload["slot"])
    if wait is None:
        return {"slot": payload["slot"], "done": True}
    return Retry(max=MAX_POLLS, interval=max(1, math.ceil(wait)))
