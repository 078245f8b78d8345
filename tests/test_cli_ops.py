"""The commands schedulers and ops scripts call: --json outputs and wait's exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT
from .datasets import tricky_rows, write


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def cli(pipeline, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "enqueue.py", *args], cwd=ROOT, env=pipeline.env(),
                          capture_output=True, text=True, timeout=timeout)


def test_json_outputs_and_wait_exit_codes(pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(12))
    submitted = json.loads(cli(pipeline, "submit", str(dataset), "-t", "Q: {{ text }}", "--json",
                               "--name", "ops-test").stdout)
    run_id = submitted["run_id"]
    assert submitted["rows"] == 12 and submitted["jobs_enqueued"] == 1

    waiting = cli(pipeline, "wait", run_id, "--timeout", "0.5")
    assert waiting.returncode == 3 and "still submitted" in waiting.stderr

    pipeline.work()
    pipeline.collect()
    status = json.loads(cli(pipeline, "status", run_id, "--json").stdout)
    assert (status["status"], status["rows_succeeded"], status["rows_pending"]) == ("completed", 12, 0)
    listed = json.loads(cli(pipeline, "runs", "--json").stdout)
    assert [(r["run_id"], r["name"], r["rows_succeeded"]) for r in listed] == [(run_id, "ops-test", 12)]
    table = cli(pipeline, "runs").stdout
    assert run_id in table and "completed" in table

    done = cli(pipeline, "wait", run_id, "--timeout", "10")
    assert done.returncode == 0, done.stderr
    watched = cli(pipeline, "status", run_id, "--watch")
    assert watched.returncode == 0 and "12/12" in watched.stderr


def test_wait_fails_when_too_many_rows_failed(pipeline, tmp_path):
    from pipeline import handoff
    from pipeline.records import Result

    dataset = write(tmp_path / "d.csv", tricky_rows(4))
    report = pipeline.submit(dataset, "Q: {{ text }}")
    pipeline.redis.delete(f"rq:queue:{pipeline.settings.queue_name}")
    for i in range(4):   # hand over results as a worker would, one of them failed
        result = Result(run_id=report.run_id, row_key=str(i), row_index=i, input={}, finished_at=1.0,
                        status="failed" if i == 0 else "succeeded")
        pipeline.redis.xadd(pipeline.settings.result_stream, {"kind": handoff.RESULT, "data": result.to_json()})
    pipeline.collect()
    assert cli(pipeline, "wait", report.run_id, "--timeout", "10").returncode == 1
    assert cli(pipeline, "wait", report.run_id, "--timeout", "10", "--max-failed", "0.25").returncode == 0


def test_unknown_run_is_a_clear_error(pipeline):
    done = cli(pipeline, "status", "rnope")
    assert done.returncode == 2 and done.stderr.strip() == "error: no run 'rnope' in Redis"


def test_default_sqlite_file_is_created_in_a_data_dir_that_does_not_exist_yet(pipeline, tmp_path):
    """With a real Redis (REDIS_URL set) nothing else creates DATA_DIR: the default SQLite file must still open."""
    data_dir = tmp_path / "fresh" / "data"
    env = {k: v for k, v in pipeline.env().items() if k != "DATABASE_URL"} | {"DATA_DIR": str(data_dir)}
    dataset = write(tmp_path / "d.csv", tricky_rows(3))
    submitted = subprocess.run([sys.executable, "enqueue.py", "submit", str(dataset), "-t", "Q: {{ text }}",
                                "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    status = subprocess.run([sys.executable, "enqueue.py", "status", json.loads(submitted.stdout)["run_id"],
                             "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["rows_total"] == 3
    assert (data_dir / "pipeline.db").exists()
