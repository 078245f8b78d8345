"""JSON logs: many processes share one rotating file and every line survives whole; secrets are redacted."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

from pipeline.logs import JsonFormatter, json_file_handler
from pipeline.redaction import register_secret

from .conftest import ROOT

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
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"p{n}", str(per_writer)], cwd=ROOT)
             for n in range(writers)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    files = sorted(path.parent.glob("pipeline.jsonl*"))
    assert len(files) > 5, "the file should have rotated several times"
    seen = []
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)                      # every line is whole JSON
            assert {"@timestamp", "level", "logger", "message", "role", "pid", "run_id"} <= entry.keys()
            seen.append(entry["message"].split()[1])
    expected = [f"p{n}-{i}" for n in range(writers) for i in range(per_writer)]
    assert sorted(seen) == sorted(expected)               # every message exactly once


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
