"""Each kind of bad input fails before anything is enqueued, with one line naming the file, row or column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .datasets import tricky_rows, write
from .processes import run_script


def _truncated_parquet(path: Path) -> Path:
    full = path.with_suffix(".full.parquet")
    pq.write_table(pa.Table.from_pylist(tricky_rows(50)), full)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _dup_ids(path: Path) -> Path:
    return write(path, [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])


BAD_INPUTS = {
    # name: (make file, extra submit args, words the one-line error must contain)
    "missing file": (lambda p: p / "nope.csv", [], ["nope.csv", "no such file"]),
    "unknown extension": (lambda p: _text(p / "data.xlsx", "a,b\n1,2\n"), [], ["data.xlsx", "unsupported"]),
    "empty file": (lambda p: _text(p / "empty.csv", ""), [], ["empty.csv", "empty"]),
    "header only": (lambda p: _text(p / "head.csv", "id,text\n"), [], ["head.csv", "no rows"]),
    "malformed csv": (
        lambda p: _text(p / "bad.csv", "id,text\n1,ok\n2,too,many\n"),
        [],
        ["bad.csv", "malformed CSV", "line 3"],
    ),
    "invalid utf-8": (lambda p: _bytes(p / "latin.csv", b"id,text\n1,caf\xe9\n"), [], ["latin.csv", "UTF-8"]),
    "jsonl not json": (
        lambda p: _text(p / "bad.jsonl", '{"text": "a"}\n{"text": oops}\n'),
        [],
        ["bad.jsonl", "line 2", "not valid JSON"],
    ),
    "jsonl not an object": (
        lambda p: _text(p / "arr.jsonl", '{"text": "a"}\n[1, 2]\n'),
        [],
        ["arr.jsonl", "line 2", "JSON object"],
    ),
    "truncated parquet": (lambda p: _truncated_parquet(p / "cut.parquet"), [], ["cut.parquet", "Parquet"]),
    "missing variable": (
        lambda p: write(p / "d.csv", tricky_rows(3)),
        ["--template", "Hi {{ nme }}"],
        ["d.csv", "row 1", "nme"],
    ),
    "duplicate ids": (
        lambda p: _dup_ids(p / "dup.csv"),
        ["--id-column", "id"],
        ["dup.csv", "row 3", "duplicate id 'a'"],
    ),
    "unknown id column": (lambda p: write(p / "d.csv", tricky_rows(3)), ["--id-column", "key"], ["d.csv", "'key'"]),
    "empty prompt": (
        lambda p: write(p / "blank.csv", [{"text": "a"}, {"text": " "}]),
        ["--template", "{{ text }}"],
        ["blank.csv", "row 2", "empty prompt"],
    ),
    "row too large": (
        lambda p: write(p / "big.jsonl", [{"text": "a"}, {"text": "b" * 5000}]),
        ["__env__MAX_ROW_BYTES=1000"],
        ["big.jsonl", "row 2", "over the limit"],
    ),
    "outside data dir": (
        lambda p: write(p / "d.csv", tricky_rows(2)),
        ["__env__ALLOWED_DATA_DIR=/srv/nowhere"],
        ["d.csv", "outside the allowed data directory"],
    ),
    "unknown provider": (
        lambda p: write(p / "d.csv", tricky_rows(2)),
        ["--provider", "nosuch", "--model", "m"],
        ["unknown provider", "nosuch"],
    ),
    "missing api key": (
        lambda p: write(p / "d.csv", tricky_rows(2)),
        ["--provider", "openai", "--model", "gpt"],
        ["OPENAI_API_KEY"],
    ),
    "template not utf-8": (
        lambda p: _beside(write(p / "d.csv", tricky_rows(2)), p / "t.j2", b"caf\xe9 {{ text }}"),
        ["--template-file", "__tmp__/t.j2"],
        ["t.j2", "template", "not UTF-8"],
    ),
    "schema not an object": (
        lambda p: _beside(write(p / "d.csv", tricky_rows(2)), p / "s.json", b"5"),
        ["--json-schema", "__tmp__/s.json"],
        ["JSON schema", "expected a JSON object"],
    ),
    "id too long": (
        lambda p: write(p / "long.csv", [{"id": "x" * 600, "text": "a"}]),
        ["--id-column", "id"],
        ["long.csv", "row 1", "600 characters", "limit of 512"],
    ),
    "template string bomb": (
        lambda p: write(p / "d.csv", tricky_rows(2)),
        ["--template", '{{ "x" * 400000000 }}'],
        ["d.csv", "row 1", "over the limit of 1,000,000"],
    ),
    "template filter bomb": (
        lambda p: write(p / "d.csv", tricky_rows(2)),
        ["--template", "{{ text | center(400000000) }}"],
        ["row 1", "over the limit"],
    ),
    "template loop bomb": (
        lambda p: write(p / "d.csv", tricky_rows(2)),
        ["--template", "{% for i in range(99999) %}{{ text * 50 }}{% endfor %}"],
        ["row 1", "rendered prompt is over the limit"],
    ),
    "runs file bad value": (
        lambda p: _beside(
            write(p / "d.csv", tricky_rows(2)),
            p / "runs.toml",
            b'[runs.x]\ndataset = "d.csv"\ntemplate = "{{ text }}"\nmax_cost = "5"\n',
        ),
        ["--config", "__tmp__/runs.toml", "--name", "x"],
        ["max_cost must be a number", "'5'"],
    ),
}


def _beside(dataset: Path, other: Path, content: bytes) -> Path:
    """The dataset, with another file the command is pointed at (template, schema, runs file)."""
    other.write_bytes(content)
    return dataset


def _text(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def _bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_nothing_enqueued(pipeline, tmp_path, case):
    make, extra, words = BAD_INPUTS[case]
    dataset = make(tmp_path)
    env = pipeline.env()
    args = [a.replace("__tmp__", str(tmp_path)) for a in extra if not a.startswith("__env__")]
    env.update(a[len("__env__") :].split("=", 1) for a in extra if a.startswith("__env__"))
    if not {"--template", "--template-file", "--config"} & set(args):
        args += ["--template", "Classify: {{ text }}"]
    done = run_script(["enqueue.py", "submit", str(dataset), *args], env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 0
    assert not list(pipeline.redis.scan_iter("run:*"))


def test_bad_row_deep_in_a_big_file_enqueues_nothing(pipeline, tmp_path):
    """The validating pass reads the whole file before the first job is enqueued."""
    rows = tricky_rows(2500)
    path = write(tmp_path / "late.jsonl", rows)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{broken\n")
    from pipeline.errors import DatasetError

    with pytest.raises(DatasetError, match="line 2501"):
        pipeline.submit(path, "Classify: {{ text }}", chunk_size=10)
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 0
