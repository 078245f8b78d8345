"""The results table's batch_id column, on SQLite and PostgreSQL: stored through the collector, and a table from
before batch mode refused with the upgrade to run."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import create_engine, text

from pipeline import handoff
from pipeline.collect import store
from pipeline.errors import ConfigError
from pipeline.records import Result, Row

from .conftest import ROOT

README = ROOT / "README.md"


def test_a_result_keeps_the_batch_it_came_from(pipeline):
    answered = Result.failure("r1", Row("a", 0, {"text": "x"}))
    answered.status, answered.answer, answered.batch_id = "succeeded", "yes", "batch_abc123"
    online = Result.failure("r1", Row("b", 1, {"text": "y"}), "boom")
    handoff.publish_results(pipeline.redis, pipeline.settings.result_stream, [answered, online])
    pipeline.collect()
    stored = {r["row_key"]: r["batch_id"] for r in pipeline.results("r1")}
    assert stored == {"a": "batch_abc123", "b": None}


def test_batch_events_land_in_the_batches_table_a_later_round_wins_and_a_known_id_stays(pipeline):
    def event(chunk, round_no, state, batch_id=None, at=100.0):
        handoff.publish_event(
            pipeline.redis,
            pipeline.settings.result_stream,
            handoff.BATCH,
            {
                "run_id": "r1",
                "chunk": chunk,
                "round": round_no,
                "batch_id": batch_id,
                "provider": "openai",
                "state": state,
                "at": at,
            },
        )

    event("c000001", 1, "intent")
    event("c000001", 1, "created", "batch_1")
    event("c000001", 2, "intent")  # round 2's intent comes before round 1's end
    event("c000001", 1, "expired", "batch_1")
    event("g1-c000001", 1, "in_progress", "batch_9", at=200.0)  # the chunk resumed later, in a new label
    event("c000002", 1, "created", "batch_2")
    event("c000002", 1, "in_progress")  # an event without the id keeps it
    pipeline.collect()
    with pipeline.engine.connect() as conn:
        first = store.chunk_batches(conn, "r1", "c000001")
        second = store.chunk_batches(conn, "r1", "c000002")
    assert [(b["chunk"], b["round"], b["batch_id"], b["state"]) for b in first] == [
        ("c000001", 2, None, "intent"),
        ("g1-c000001", 1, "batch_9", "in_progress"),
    ]
    assert [(b["batch_id"], b["state"], b["provider"]) for b in second] == [("batch_2", "in_progress", "openai")]


def test_a_results_table_from_before_batch_mode_is_refused_with_its_upgrade(database_url):
    engine = create_engine(database_url)
    store.prepare(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE results DROP COLUMN batch_id"))
    with pytest.raises(ConfigError, match=r"older version \(no batch id\).* 'Upgrading a database'"):
        store.prepare(engine)
    statement = re.search(r"^ALTER TABLE results ADD COLUMN batch_id .*;$", README.read_text(), re.MULTILINE)
    with engine.begin() as conn:
        conn.execute(text(statement.group(0)))
    store.prepare(engine)
    engine.dispose()
