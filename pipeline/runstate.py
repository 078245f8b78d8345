"""A run's state in Redis, shared by the front ends and the workers: its configuration and its flags.

Kept apart from ``runs`` so that workers need neither pandas nor SQLAlchemy to start a job.
"""
from __future__ import annotations

import json

import redis

from .errors import RunNotFound
from .records import RunConfig

SUBMITTED, RUNNING, CANCELLED, BUDGET_EXHAUSTED = "submitted", "running", "cancelled", "budget_exhausted"


def config_key(run_id: str) -> str:
    return f"run:{run_id}:config"


def cancelled_key(run_id: str) -> str:
    return f"run:{run_id}:cancelled"


def load_config(connection: redis.Redis, run_id: str) -> RunConfig:
    raw = connection.get(config_key(run_id))
    if raw is None:
        raise RunNotFound(f"no run {run_id!r} in Redis")
    return RunConfig.from_dict(json.loads(raw))


def save_config(connection: redis.Redis, config: RunConfig) -> None:
    connection.set(config_key(config.run_id), json.dumps(config.to_dict()))
