"""Nightly runs: a runs file, RQ's cron scheduler, and idempotent firings."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from pipeline.control.schedules import firing_key, load_runs_file

from .conftest import ROOT
from .datasets import tricky_rows, write
from .processes import cli


def _runs_file(tmp_path, schedule: str) -> str:
    write(tmp_path / "data.csv", tricky_rows(25))
    (tmp_path / "prompt.j2").write_text("Classify: {{ text }}", encoding="utf-8")
    path = tmp_path / "runs.toml"
    path.write_text(
        f"""
[runs.nightly]
dataset = "data.csv"
template_file = "prompt.j2"
id_column = "id"
chunk_size = 10
{schedule}
""",
        encoding="utf-8",
    )
    return str(path)


def _run_configs(pipeline) -> list[bytes]:
    return list(pipeline.redis.scan_iter("run:*:config"))


def test_a_cron_line_triggered_twice_starts_one_run(pipeline, tmp_path):
    runs_file = _runs_file(tmp_path, 'cron = "0 2 * * *"')
    first = cli(pipeline, "submit", "--config", runs_file, "--name", "nightly")
    second = cli(pipeline, "submit", "--config", runs_file, "--name", "nightly")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.startswith("run ") and "3 jobs enqueued" in first.stdout
    assert second.stdout.startswith("existing run ") and "0 jobs enqueued" in second.stdout
    assert first.stdout.split()[1] == second.stdout.split()[2]
    assert len(_run_configs(pipeline)) == 1
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 3


def test_unknown_named_run_is_a_clear_error(pipeline, tmp_path):
    done = cli(pipeline, "submit", "--config", _runs_file(tmp_path, ""), "--name", "weekly")
    assert done.returncode == 2 and "no run named 'weekly'" in done.stderr


def test_firing_key_is_the_schedule_slot(tmp_path):
    run = load_runs_file(Path(_runs_file(tmp_path, 'cron = "0 2 * * *"')))["nightly"]
    local = datetime(2026, 11, 24, 2, 0, 3).astimezone()
    later = datetime(2026, 11, 24, 2, 7, 0).astimezone()
    assert firing_key(run, local) == firing_key(run, later) == "nightly@2026-11-24T02:00"
    assert firing_key(run, datetime(2026, 11, 25, 2, 0, 1).astimezone()) == "nightly@2026-11-25T02:00"


def test_rq_cron_scheduler_fires_and_a_double_scheduler_makes_one_run(pipeline, tmp_path):
    """Two scheduler processes fire the same slot and submit it themselves: one run, its chunks queued once. The
    rows travel in the chunk jobs, so the workers finish the run after the dataset is gone from the disk."""
    runs_file = _runs_file(tmp_path, "every = 86400")
    queue_key = f"rq:queue:{pipeline.settings.queue_name}"
    logs = [tmp_path / f"scheduler{i}.log" for i in range(2)]
    schedulers = [
        subprocess.Popen(
            [sys.executable, "enqueue.py", "schedule", "--runs", runs_file],
            cwd=ROOT,
            env=pipeline.env(LOG_LEVEL="INFO"),
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        for log in logs
    ]

    def fired() -> bool:
        return all("scheduled run nightly:" in log.read_text() for log in logs)

    try:
        deadline = time.monotonic() + 30
        while not fired() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fired(), "both schedulers should have fired: " + " / ".join(log.read_text() for log in logs)
    finally:
        for process in schedulers:
            process.terminate()
            process.wait(timeout=10)
    assert len(_run_configs(pipeline)) == 1
    assert pipeline.redis.llen(queue_key) == 3  # 25 rows in chunks of 10, enqueued by one firing
    (tmp_path / "data.csv").unlink()  # workers need no file: the rows are in the jobs
    pipeline.work()
    pipeline.collect()
    run_id = _run_configs(pipeline)[0].decode().split(":")[1]
    assert len(pipeline.results(run_id)) == 25
    assert pipeline.run_row(run_id)["status"] == "completed"


def test_a_firing_that_cannot_submit_logs_one_line_and_the_scheduler_goes_on(pipeline, tmp_path, caplog):
    from pipeline.control.schedules import fire

    runs_file = Path(_runs_file(tmp_path, "every = 60"))
    (tmp_path / "data.csv").unlink()
    assert fire(pipeline.redis, pipeline.settings, runs_file, "nightly", datetime.now().astimezone()) is None
    assert "scheduled run nightly not submitted:" in caplog.text and "data.csv" in caplog.text
    assert _run_configs(pipeline) == []
