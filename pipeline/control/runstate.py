"""A run's state in Redis, shared by the front ends and the workers: its configuration, its flags, and how long
its keys are kept once the run is final.

Kept apart from ``runs`` so that workers need neither pandas nor SQLAlchemy to start a job.
"""

from __future__ import annotations

import json

import redis

from pipeline.calls.budget import holds_key, spend_key
from pipeline.errors import RunNotFound
from pipeline.handoff import done_key
from pipeline.queue import enqueued_key
from pipeline.records import RunConfig

SUBMITTED, RUNNING, CANCELLED, BUDGET_EXHAUSTED = "submitted", "running", "cancelled", "budget_exhausted"


def config_key(run_id: str) -> str:
    return f"run:{run_id}:config"


def cancelled_key(run_id: str) -> str:
    return f"run:{run_id}:cancelled"


def generation_key(run_id: str) -> str:
    return f"run:{run_id}:generation"


def submitted_key(run_id: str) -> str:
    """Set once every chunk of the run's first generation is enqueued."""
    return f"run:{run_id}:submitted"


def idempotency_key(key: str, owner: str | None = None) -> str:
    """Keys are scoped by owner: one web user's key can never find another user's run (nor a CLI run's key)."""
    return f"runs:idempotency:{key}" if owner is None else f"runs:idempotency-of:{owner}:{key}"


def load_config(connection: redis.Redis, run_id: str) -> RunConfig:
    raw = connection.get(config_key(run_id))
    if raw is None:
        raise RunNotFound(f"no run {run_id!r} in Redis")
    return RunConfig.from_dict(json.loads(raw))


def save_config(connection: redis.Redis, config: RunConfig) -> None:
    connection.set(config_key(config.run_id), json.dumps(config.to_dict()))


def run_keys(connection: redis.Redis, run_id: str) -> list[str]:
    """Every lasting Redis key of one run (its idempotency key too, read from its config). The requeue claim
    (``runlock``) is left out: it lapses on its own and must never lose its expiry."""
    keys = [
        config_key(run_id),
        cancelled_key(run_id),
        generation_key(run_id),
        submitted_key(run_id),
        enqueued_key(run_id),
        done_key(run_id),
        spend_key(run_id),
        holds_key(run_id),
        f"run:{run_id}:batches",
    ]  # batch mode's slots (pipeline.calls.batchstate.run_slots_key)
    try:
        config = load_config(connection, run_id)
        key, owner = config.idempotency_key, config.owner
    except (RunNotFound, ValueError, TypeError):
        key = owner = None
    return keys + ([idempotency_key(key, owner)] if key else [])


def expire_run(connection: redis.Redis, run_id: str, seconds: int) -> None:
    """A final run's keys go ``seconds`` from now: SQL keeps its record, and ``resume`` rebuilds them from SQL."""
    with connection.pipeline(transaction=False) as pipe:
        for key in run_keys(connection, run_id):
            pipe.expire(key, seconds)
        pipe.execute()


def keep_run(connection: redis.Redis, run_id: str) -> None:
    """A run that runs again (resume, retry-failed) keeps its keys until it is final again."""
    with connection.pipeline(transaction=False) as pipe:
        for key in run_keys(connection, run_id):
            pipe.persist(key)
        pipe.execute()
