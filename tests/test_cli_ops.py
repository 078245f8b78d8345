"""The commands schedulers and ops scripts call: --json outputs and wait's exit codes."""

from __future__ import annotations

import json

import pytest

from .datasets import tricky_rows, write
from .processes import cli, run_script


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def test_json_outputs_and_wait_exit_codes(pipeline, tmp_path):
    dataset = write(tmp_path / "d.csv", tricky_rows(12))
    submitted = json.loads(
        cli(pipeline, "submit", str(dataset), "-t", "Q: {{ text }}", "--json", "--name", "ops-test").stdout
    )
    run_id = submitted["run_id"]
    assert submitted["rows"] == 12 and submitted["jobs_enqueued"] == 1

    waiting = cli(pipeline, "wait", run_id, "--timeout", "0.5")
    assert waiting.returncode == 3 and "still submitted" in waiting.stderr
    assert "no worker is consuming queue pipeline" in waiting.stderr

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
    for i in range(4):  # hand over results as a worker would, one of them failed
        result = Result(
            run_id=report.run_id,
            row_key=str(i),
            row_index=i,
            input={},
            finished_at=1.0,
            status="failed" if i == 0 else "succeeded",
        )
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
    submitted = run_script(["enqueue.py", "submit", str(dataset), "-t", "Q: {{ text }}", "--json"], env)
    assert submitted.returncode == 0, submitted.stderr
    status = run_script(["enqueue.py", "status", json.loads(submitted.stdout)["run_id"], "--json"], env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["rows_total"] == 3
    assert (data_dir / "pipeline.db").exists()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_submit_progress_has_a_total_per_stage_and_reaches_it(pipeline, tmp_path, suffix):
    import io

    from enqueue import StageBars
    from pipeline.control import runs
    from pipeline.intake.progress import Progress

    rows = 3000
    dataset = write(tmp_path / f"d{suffix}", tricky_rows(rows))
    events: list[Progress] = []
    request = runs.RunRequest(dataset=dataset, template="Q: {{ text }}", id_column="id", chunk_size=50)
    drawn = io.StringIO()
    with StageBars(file=drawn, disable=False) as bars:
        runs.submit(pipeline.redis, pipeline.settings, request, progress=lambda p: (events.append(p), bars(p)))

    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["reading", "hashing", "enqueueing"]
    totals = {"reading": dataset.stat().st_size, "hashing": dataset.stat().st_size, "enqueueing": rows}
    for stage in stages:
        seen = [e for e in events if e.stage == stage]
        assert {e.total for e in seen} == {totals[stage]}
        assert [e.done for e in seen] == sorted({e.done for e in seen})  # only forward
        assert seen[0].done == 0 and seen[-1].done == seen[-1].total  # shown at once, ends at 100 %
    text = drawn.getvalue()
    assert text.count("100%") >= 3 and f"{rows}/{rows}" in text


def test_watch_rate_is_measured_over_its_own_window():
    from pipeline.intake.progress import RateWindow

    window = RateWindow(seconds=30)
    assert window.add(100.0, 5000) is None  # 5000 rows done before the watch began are not a rate
    assert window.add(101.0, 5010) == 10.0
    assert window.add(102.0, 5020) == 10.0
    for second in range(103, 141):  # then 1 row/s: after the window's 30 s, 10/s is forgotten
        rate = window.add(float(second), 5020 + second - 102)
    assert rate == 1.0
    assert window.samples[0][0] == 110.0 and len(window.samples) == 31


def test_status_says_so_when_no_worker_consumes_the_queue(pipeline, tmp_path):
    from rq import Worker

    from pipeline.control import runs
    from pipeline.queue import SERIALIZER, chunk_queue

    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(5)), "Q: {{ text }}")
    queue = pipeline.settings.queue_name
    shown = cli(pipeline, "status", report.run_id)
    assert shown.returncode == 0 and f"no worker is consuming queue {queue}" in shown.stdout

    def status() -> dict:
        return runs.run_status(pipeline.redis, pipeline.engine, report.run_id, queue)

    assert status()["workers"] == 0
    worker = Worker([chunk_queue(pipeline.redis, pipeline.settings)], connection=pipeline.redis, serializer=SERIALIZER)
    worker.register_birth()  # a live worker listening on the queue (it takes no job here)
    try:
        assert (status()["workers"], status()["note"]) == (1, None)
    finally:
        worker.register_death()
    assert status()["workers"] == 0 and f"no worker is consuming queue {queue}" in status()["note"]


def test_replay_parked_lands_what_an_older_collector_parked(pipeline, tmp_path):
    """A deploy done out of order: a newer worker's ``results`` entry reached an older collector, which parked it
    as an unknown kind. Once the collector is upgraded, ``replay-parked`` puts it back and its rows land once."""
    from pipeline import handoff
    from pipeline.records import Result

    dataset = write(tmp_path / "d.csv", tricky_rows(3))
    report = pipeline.submit(dataset, "Q: {{ text }}")
    pipeline.redis.delete(f"rq:queue:{pipeline.settings.queue_name}")
    results = [
        Result(run_id=report.run_id, row_key=str(i), row_index=i, input={}, finished_at=1.0, status="succeeded")
        for i in range(3)
    ]
    parked = f"{pipeline.settings.result_stream}:parked"
    data = json.dumps({"results": [json.loads(r.to_json()) for r in results]})
    pipeline.redis.xadd(parked, {"kind": handoff.RESULTS, "data": data, "reason": "unknown entry kind 'results'"})
    handoff.publish_results(pipeline.redis, pipeline.settings.result_stream, results[:1])  # r0 also came normally
    pipeline.collect()
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 1

    replayed = cli(pipeline, "replay-parked")
    assert replayed.returncode == 0 and replayed.stdout.startswith("1 parked entries put back")
    assert handoff.waiting(pipeline.redis, pipeline.settings.result_stream) == 3  # what the backlog metric shows
    pipeline.collect()
    assert pipeline.redis.xlen(parked) == 0 and handoff.waiting(pipeline.redis, pipeline.settings.result_stream) == 0
    assert sorted(r["row_key"] for r in pipeline.results(report.run_id)) == ["0", "1", "2"]
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_succeeded"]) == ("completed", 3)
