"""A run's Redis state rebuilt from SQL, the record of what is done, after Redis lost it.

Redis without persistence (the embedded default saves only on a clean exit) or a flushed database loses a
run's config, its done rows and its spend; its expiry after RUN_RETENTION_SECONDS drops them on purpose.
``resume`` and ``retry-failed`` then call ``known_config``: the config comes from the runs table, every row
with a succeeded or failed result there is marked done (so no chunk asks a provider for it again), and a
capped run's spend starts from its SQL total. Only Redis is written; SQL is only read.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import handoff
from pipeline.calls.budget import spend_key
from pipeline.collect import store
from pipeline.control.runstate import config_key, idempotency_key, load_config, submitted_key
from pipeline.errors import RunNotFound
from pipeline.records import FAILED, SUCCEEDED, RunConfig

DONE_BATCH = 1000  # row keys per HSET


def known_config(connection: redis.Redis, engine: Engine | None, run_id: str) -> RunConfig:
    """The run's config from Redis, or, when Redis no longer has it, from SQL with its state rebuilt."""
    try:
        return load_config(connection, run_id)
    except RunNotFound:
        if engine is None:
            raise
    return rebuild(connection, engine, run_id)


def recorded_submit(connection: redis.Redis, engine: Engine, run_id: str) -> bool:
    """A ``submit`` of a run that Redis does not know: if SQL has it (Redis lost it), rebuild its state so that
    the submit goes on as a repeated one: rows with a result in SQL are done, and a run that is final in SQL, or
    has every row done, is marked submitted so that nothing is enqueued. False when SQL has no such run (or
    does not answer: the submit then starts the run afresh, as it would without SQL)."""
    try:
        rebuild(connection, engine, run_id)
        with engine.connect() as conn:
            run = store.get_run(conn, run_id)
    except (RunNotFound, SQLAlchemyError):
        return False
    if run is None:
        return False
    status = run["status"]
    config = load_config(connection, run_id)
    if status in store.FINAL_STATUSES or connection.hlen(handoff.done_key(run_id)) >= config.total_rows:
        connection.set(submitted_key(run_id), "1")
    return True


def rebuild(connection: redis.Redis, engine: Engine, run_id: str) -> RunConfig:
    with engine.connect() as conn:
        row = store.get_run(conn, run_id)
        if row is None or row["dataset_hash"] == store.UNREGISTERED:
            raise RunNotFound(f"no run {run_id!r} in Redis or in the database")
        config = RunConfig.from_dict(row["config"])
        _mark_done(connection, run_id, store.result_statuses(conn, run_id))
    if config.max_cost is not None:
        connection.set(spend_key(run_id), row["cost_nano"])  # exact: both are nano-dollars
    if config.idempotency_key:
        connection.set(idempotency_key(config.idempotency_key, config.owner), run_id, nx=True)
    connection.set(config_key(run_id), json.dumps(config.to_dict()), nx=True)  # last: the run is whole now
    return load_config(connection, run_id)


def _mark_done(connection: redis.Redis, run_id: str, statuses) -> None:
    """Rows with a final result in SQL are done; ``retrying`` rows (sent by a retry-failed whose jobs Redis
    lost) are not, so that resume sends them again."""
    batch: dict[Any, str] = {}  # (redis-py types hset's keys as an invariant union)
    for row_key, status in statuses:
        if status in (SUCCEEDED, FAILED):
            batch[row_key] = status
        if len(batch) >= DONE_BATCH:
            connection.hset(handoff.done_key(run_id), mapping=batch)
            batch = {}
    if batch:
        connection.hset(handoff.done_key(run_id), mapping=batch)
