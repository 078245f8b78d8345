"""The fast batch readers read every file exactly as the row-by-row readers do, and the chunk jobs' serialized
rows decode to the payload the workers always got."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DatasetError, TemplateError
from pipeline.intake import datasets
from pipeline.intake.templates import PromptTemplate
from pipeline.queue import JOB_FUNCTION, chunk_data, chunk_payload
from pipeline.records import Row

from .datasets import tricky_rows, write

CSV_FILES = {
    "tricky": None,  # tests.datasets' quotes, commas, newlines, non-ASCII
    "bom crlf": '\ufeffid,text\r\n1,"a ""q"" b"\r\n2, x "y" z\r\n',
    "blank lines": 'id,text\n1,a\n\n2,b\n,\n   ,  \n3,"x\ny"\n',
    "short row": "id,text\n1,a\n2\n3,c\n",
    "no final newline": "id,text\n1,a\n2,b",
    "duplicate header": "id,id\n1,2\n",
    "na words": "id,text\nNA,null\nnan,None\n",
}


def _legacy_rows(path: Path, id_column: str | None) -> list[Row]:
    rows = []
    for index, record in enumerate(datasets.READERS[datasets.dataset_format(path)](path)):
        values = {str(k): datasets.json_safe(v) for k, v in record.items()}
        key = str(index) if id_column is None else str(values[id_column])
        rows.append(Row(key, index, values))
    return rows


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.parametrize("case", sorted(CSV_FILES))
def test_csv_reads_as_the_row_by_row_reader(tmp_path, case):
    path = tmp_path / "d.csv"
    if CSV_FILES[case] is None:
        write(path, tricky_rows(2000))
    else:
        path.write_text(CSV_FILES[case], encoding="utf-8", newline="")
    assert list(datasets.iter_rows(path)) == _legacy_rows(path, None)


def test_jsonl_reads_as_the_row_by_row_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in tricky_rows(50)]
    lines += [
        '{"id": "n", "x": NaN, "y": [1e400, {"z": -Infinity}]}',
        "",
        "   ",
        '  {"id": "lead"}',
        '{"id": "u", "t": "\\u00e9\\ud83d\\ude42"}',
        '{"id": "tail"}   \r',
    ]
    lines += [json.dumps(r) for r in tricky_rows(30)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = list(datasets.iter_rows(path))
    assert rows == _legacy_rows(path, None)
    assert rows[50].values == {"id": "n", "x": None, "y": [None, {"z": None}]}


def test_parquet_reads_as_the_row_by_row_reader(tmp_path):
    table = pa.table(
        {
            "id": [f"k{i}" for i in range(30)],
            "text": [None if i % 7 == 0 else f"t{i}" for i in range(30)],
            "n": list(range(30)),
            "f": [math.nan if i % 5 == 0 else i / 3 for i in range(30)],
            "when": [dt.datetime(2024, 1, 1) + dt.timedelta(hours=i) for i in range(30)],
            "tags": [["a", str(i)] for i in range(30)],
            "cat": pa.array([f"c{i % 3}" for i in range(30)]).dictionary_encode(),
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=7)
    rows = list(datasets.iter_rows(path, "id"))
    assert rows == _legacy_rows(path, "id")
    assert rows[0].values["f"] is None and rows[0].values["when"] == "2024-01-01T00:00:00"


def test_serialized_rows_decode_to_the_payload_workers_read(tmp_path):
    path = write(tmp_path / "d.parquet", [{**r, "n": i} for i, r in enumerate(tricky_rows(25))])
    chunks = list(datasets.serialized_chunks(path, 10, "id"))
    rows = list(datasets.iter_chunks(path, 10, "id"))
    assert [c.count for c in chunks] == [10, 10, 5]
    for n, (serialized, plain) in enumerate(zip(chunks, rows)):
        data = json.loads(chunk_data("r1", f"c{n:06d}", serialized))
        assert data == [JOB_FUNCTION, None, [chunk_payload("r1", f"c{n:06d}", plain)], {}]
        assert json.loads(chunk_data("r1", f"c{n:06d}", plain)) == data


def _scan_error(path: Path, template: str, **options) -> str:
    with pytest.raises(DatasetError) as caught:
        datasets.scan(path, template=PromptTemplate(template), **options)
    return str(caught.value)


def test_checks_name_the_first_bad_row_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "READ_BATCH", 7)
    rows = [{"id": f"i{n}", "text": f"t{n}"} for n in range(40)]
    rows[23] = {"id": "i23"}  # the template's variable is missing from row 24
    rows[31] = {"id": "i31", "text": " "}  # blank prompt
    path = write(tmp_path / "d.jsonl", rows)
    assert _scan_error(path, "{{ text }}") == f"{path}: row 24: template variable missing: 'text' is undefined"
    path = write(tmp_path / "e.jsonl", rows[:23] + rows[24:])
    assert _scan_error(path, "{{ text }}") == f"{path}: row 31: the template renders an empty prompt"
    assert (
        _scan_error(path, "x {{ text }}", id_column="id", max_row_bytes=10)
        == f"{path}: row 1: 26 bytes, over the limit of 10"
    )
    assert "row 31" in _scan_error(path, "{{ text | trim }}")  # rendered row by row: same answer


def test_duplicate_id_found_in_a_later_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "READ_BATCH", 7)
    rows = [{"id": f"i{n % 30}", "text": "t"} for n in range(35)]
    path = write(tmp_path / "d.parquet", rows)
    assert _scan_error(path, "{{ text }}", id_column="id") == f"{path}: row 31: duplicate id 'i0' in column 'id'"


def _render_error(template: PromptTemplate, values: dict) -> str:
    with pytest.raises(TemplateError) as caught:
        template.render(values)
    return str(caught.value)


@pytest.mark.parametrize("source", ["Echo: {{ text }}", "{{ a }}{{ b }} and {{a}}\n", "  {{ text }}  \n\n"])
def test_a_plain_template_renders_as_jinja_does_without_jinja(source):
    plain = PromptTemplate(source)
    jinja = PromptTemplate("{{ '' }}" + source)  # a constant output: not plain, so rendered by Jinja
    assert plain._pieces is not None and jinja._pieces is None
    for values in ({"text": "x", "a": None, "b": 1.5}, {"text": [1, "é"], "a": True, "b": {"k": b"v"}}):
        assert plain.render(values) == jinja.render(values)
    assert _render_error(plain, {}) == _render_error(jinja, {})
