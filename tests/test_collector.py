"""The collector against what real data and real providers send: content one database refuses must not stall
the others' results, and every row still ends with exactly one result. Runs on SQLite and PostgreSQL."""
from __future__ import annotations

import json

from pipeline import handoff
from pipeline.records import SUCCEEDED, Result

TEMPLATE = "Q: {{ text }}"


def test_nul_characters_and_infinities_reach_sql(pipeline, tmp_path):
    """PostgreSQL text refuses NUL and its JSON refuses NaN/Infinity; both come in real files and answers."""
    dataset = tmp_path / "odd.jsonl"
    dataset.write_text('{"id": "a", "text": "nul \\u0000 inside", "score": Infinity}\n'
                       '{"id": "b", "text": "plain", "score": NaN}\n'
                       '{"id": "c", "text": "fine", "score": 1.5}\n', encoding="utf-8")
    report = pipeline.submit(dataset, TEMPLATE, id_column="id")
    pipeline.work()
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert {k: r["status"] for k, r in results.items()} == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
    assert results["a"]["answer"] == "ECHO: Q: nul \ufffd inside"
    assert (results["a"]["input"]["score"], results["b"]["input"]["score"], results["c"]["input"]["score"]) == \
        (None, None, 1.5)
    assert pipeline.run_row(report.run_id)["status"] == "completed"


def test_a_result_the_database_refuses_does_not_hold_up_the_batch(pipeline, tmp_path):
    """A provider that reports an absurd model name (over the column's 200 characters): PostgreSQL refuses the
    row. The batch is then written entry by entry; that row is stored as failed, saying why; the rest as sent."""
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"r{i}", "text": f"t{i}"}) + "\n" for i in range(5)))
    report = pipeline.submit(dataset, TEMPLATE, id_column="id")
    pipeline.redis.delete(f"rq:queue:{pipeline.settings.queue_name}")      # this test plays the worker

    def answer(i: int, model: str) -> Result:
        return Result(run_id=report.run_id, row_key=f"r{i}", row_index=i, status=SUCCEEDED, input={"text": f"t{i}"},
                      answer=f"answer {i}", provider="openai", model=model, attempts=1, input_tokens=3,
                      output_tokens=2, cost=0.001, finished_at=1000.0 + i)

    handoff.publish_results(pipeline.redis, pipeline.settings.result_stream,
                            [answer(i, "m" * 300 if i == 2 else "gpt-4o-mini") for i in range(5)])
    pipeline.collect()
    results = {r["row_key"]: r for r in pipeline.results(report.run_id)}
    assert len(results) == 5 and pipeline.redis.xlen(pipeline.settings.result_stream) == 0
    assert all(results[f"r{i}"]["answer"] == f"answer {i}" for i in (0, 1, 3, 4))
    run = pipeline.run_row(report.run_id)
    if pipeline.engine.dialect.name == "postgresql":
        assert results["r2"]["status"] == "failed" and "could not be stored" in results["r2"]["error"]
        assert (run["rows_succeeded"], run["rows_failed"]) == (4, 1)
    else:                                                   # SQLite does not enforce the length
        assert (run["rows_succeeded"], run["rows_failed"]) == (5, 0)
    assert run["status"] == "completed"
