"""Liveness and readiness, the only endpoints answered without a token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from apiflask import APIBlueprint
from apiflask.types import ResponsesObjectType
from sqlalchemy import Engine, text

from .schemas import HealthOut

NOT_READY: ResponsesObjectType = {
    503: {"description": "Not ready", "content": {"application/json": {"schema": HealthOut}}}
}


def build_blueprint(connection: redis.Redis, engine: Engine) -> APIBlueprint:
    bp = APIBlueprint("health", __name__, tag="Health")

    @bp.get("/healthz")
    @bp.output(HealthOut)
    @bp.doc(summary="Liveness", description="The process answers.")
    def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @bp.get("/readyz")
    @bp.output(HealthOut)
    @bp.doc(
        summary="Readiness",
        description="Redis and the database answer (503 names the one that does not).",
        responses=NOT_READY,
    )
    def readyz() -> tuple[dict[str, Any], int]:
        failing = [
            name
            for name, check in (("redis", lambda: connection.ping()), ("database", lambda: _select_one(engine)))
            if not _answers(check)
        ]
        return {"status": "ok" if not failing else "unavailable", "checks": failing}, 503 if failing else 200

    return bp


def _select_one(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _answers(check: Callable[[], object]) -> bool:
    try:
        check()
        return True
    except Exception:
        return False
