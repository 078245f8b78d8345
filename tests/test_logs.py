"""JSON logs: many processes share one rotating file and every line survives whole; secrets are redacted; a run
logs one INFO summary per chunk (provider calls only at DEBUG); rotation follows the settings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pipeline.logs import JsonFormatter, json_file_handler
from pipeline.redaction import register_secret

from . import processes
from .conftest import ROOT
from .datasets import tricky_rows, write
from .fakeprovider import FakeProvider

WRITER = """
import logging, sys
from pipeline.logs import json_file_handler
handler = json_file_handler(sys.argv[1], "worker", max_bytes=20_000, backups=500)
log = logging.getLogger("pipeline.test")
log.addHandler(handler)
log.setLevel(logging.INFO)
for i in range(int(sys.argv[3])):
    log.info("message %s-%d %s", sys.argv[2], i, "x" * 80, extra={"run_id": "r-" + sys.argv[2]})
"""


def test_processes_logging_through_rotation_lose_no_line(tmp_path):
    path = tmp_path / "logs" / "pipeline.jsonl"
    writers, per_writer = 4, 400
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"p{n}", str(per_writer)], cwd=ROOT)
        for n in range(writers)
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    files = sorted(path.parent.glob("pipeline.jsonl*"))
    assert len(files) > 5, "the file should have rotated several times"
    seen = []
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)  # every line is whole JSON
            assert {"@timestamp", "level", "logger", "message", "role", "pid", "run_id"} <= entry.keys()
            seen.append(entry["message"].split()[1])
    expected = [f"p{n}-{i}" for n in range(writers) for i in range(per_writer)]
    assert sorted(seen) == sorted(expected)  # every message exactly once


def test_registered_secrets_never_reach_the_json_log(tmp_path):
    secret = "sk-test-SECRET1234567890abcd"
    register_secret(secret)
    handler = json_file_handler(tmp_path / "app.jsonl", "test")
    log = logging.getLogger("pipeline.secret-test")
    log.addHandler(handler)
    try:
        log.error("calling with key %s", secret)
        try:
            raise RuntimeError(f"provider said: Incorrect API key provided: {secret}")
        except RuntimeError:
            log.exception("call failed")
    finally:
        log.removeHandler(handler)
        handler.close()
    text = (tmp_path / "app.jsonl").read_text(encoding="utf-8")
    assert secret not in text and text.count("[REDACTED]") >= 2
    assert isinstance(handler.formatter, JsonFormatter)


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def _entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_run_logs_one_info_summary_per_chunk_with_its_run_id_and_each_call_at_debug(make_pipeline, tmp_path):
    log_file = tmp_path / "logs" / "pipeline.jsonl"
    rows = 40
    with FakeProvider(rules=[{"match": "#7", "action": 400}]) as server:  # one row fails for good
        pipeline = make_pipeline(
            openai_api_key="sk-test", openai_base_url=f"{server.url}/v1", log_file=log_file, log_level="DEBUG"
        )
        report = pipeline.submit(
            write(tmp_path / "d.csv", tricky_rows(rows)),
            "Q: {{ text }}",
            provider="openai",
            model="gpt-4o-mini",
            chunk_size=20,
        )
        worker = processes.start(["worker.py", "--burst"], pipeline.env())
        assert worker.wait(timeout=60) == 0, worker.stderr.read().decode()[-2000:]
    entries = _entries(log_file)
    ours = [e for e in entries if e.get("run_id") == report.run_id]
    chunks = [e for e in ours if e["level"] == "INFO"]
    calls = [e for e in ours if e["logger"] == "pipeline.answer"]

    assert sorted(e["chunk"] for e in chunks) == ["c000000", "c000001"]  # the run's only INFO lines
    assert sum(e["rows"] for e in chunks) == rows
    assert (sum(e["succeeded"] for e in chunks), sum(e["failed"] for e in chunks)) == (rows - 1, 1)
    assert all(
        e["cached"] == 0
        and e["input_tokens"] > 0
        and e["output_tokens"] > 0
        and e["cost_usd"] > 0
        and e["seconds"] >= 0
        and e["logger"] == "pipeline.job"
        for e in chunks
    )
    assert report.run_id in chunks[0]["message"] and "succeeded" in chunks[0]["message"]
    assert len(calls) == sum(e["attempts"] for e in chunks) == rows  # every call, each at DEBUG
    assert {e["level"] for e in calls} == {"DEBUG"}
    assert sorted(e["outcome"] for e in calls) == ["200"] * (rows - 1) + ["400"]
    assert sum(e["level"] == "INFO" for e in entries) < rows  # INFO does not grow with the calls


ROTATION = """
import logging
from pipeline.logs import setup_logging
from pipeline.settings import load_settings
setup_logging(load_settings(), "worker")
handler = logging.getLogger().handlers[-1]
print(type(handler).__name__, handler.maxBytes, handler.backupCount)
"""


def test_rotation_size_and_count_come_from_the_settings(tmp_path):
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "LOG_FILE": str(tmp_path / "p.jsonl"),
        "LOG_MAX_BYTES": "123456",
        "LOG_BACKUP_COUNT": "17",
    }
    done = subprocess.run(
        [sys.executable, "-c", ROTATION], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ConcurrentRotatingFileHandler", "123456", "17"]
