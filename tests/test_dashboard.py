"""The queue dashboard (dashboard.py: rq-dashboard's blueprint, JSON jobs, basic auth) over HTTP during a run,
with a real worker busy on a chunk."""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from rq import Worker

from pipeline.queue import SERIALIZER, chunk_queue

from . import processes
from .conftest import ROOT
from .datasets import tricky_rows, write
from .ports import free_port

PASSWORD = "s3cret-for-tests"


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def _get(url: str, password: str | None = PASSWORD) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answers yet."""
    req = urllib.request.Request(url)
    if password is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _busy_job(pipeline) -> str | None:
    """The job id a live worker of the chunk queue is running right now, read from Redis with RQ itself."""
    queue = chunk_queue(pipeline.redis, pipeline.settings)
    for worker in Worker.all(queue=queue, serializer=SERIALIZER):
        if worker.get_current_job_id():
            return worker.get_current_job_id()
    return None


def test_workers_page_and_its_data_answer_while_a_worker_is_busy(pipeline, tmp_path):
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(40)), "Q: {{ text }}", chunk_size=40)
    port = free_port()
    env = pipeline.env(
        FAKE_LATENCY="0.5", WORKER_CONCURRENCY="1", DASHBOARD_PORT=str(port), DASHBOARD_PASSWORD=PASSWORD
    )
    worker = processes.start(["worker.py", "--processes", "1"], env)
    dashboard = processes.start(["dashboard.py"], env)
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_for(
            lambda: _busy_job(pipeline) is not None or worker.poll() is not None,
            60,
            "the worker to be busy on the run's chunk",
        )
        job_id = _busy_job(pipeline)
        assert job_id is not None and job_id.startswith(report.run_id), worker.stderr.read().decode()
        processes.wait_for(
            lambda: _get(f"{url}/0/data/queues.json")[0] != 0 or dashboard.poll() is not None,
            30,
            "the dashboard to answer",
        )
        assert dashboard.poll() is None, dashboard.stderr.read().decode()

        status, body = _get(f"{url}/0/data/workers.json")  # what the Workers page polls
        assert status == 200, body[-2000:]
        workers = json.loads(body)["workers"]
        assert [w["current_job"]["job_id"] for w in workers if w["current_job"] != "idle"] == [job_id]
        status, page = _get(f"{url}/0/view/workers")
        assert status == 200 and b"Workers" in page
        status, body = _get(f"{url}/0/data/jobs/{pipeline.settings.queue_name}/started/8/asc/1.json")
        assert status == 200 and [j["id"] for j in json.loads(body)["jobs"]] == [job_id]
        status, body = _get(f"{url}/0/data/job/{job_id}.json")
        assert status == 200 and json.loads(body)["id"] == job_id
        assert _get(f"{url}/0/view/job/{job_id}")[0] == 200
        status, body = _get(f"{url}/0/data/queues.json")
        assert status == 200 and pipeline.settings.queue_name in {q["name"] for q in json.loads(body)["queues"]}
        assert _busy_job(pipeline) == job_id  # all of the above while the worker was still on the chunk

        for path in ("/0/view/workers", "/0/data/workers.json", "/0/data/queues.json"):
            assert _get(url + path, password=None)[0] == 401
            assert _get(url + path, password="wrong")[0] == 401
        cmdline = Path(f"/proc/{dashboard.pid}/cmdline").read_bytes().split(b"\0")
        assert not any(b"redis" in arg for arg in cmdline)  # the Redis URL is not visible in ps
    finally:
        processes.kill_tree(worker)
        dashboard.terminate()
        dashboard.wait(timeout=10)


def test_dashboard_refuses_to_start_without_a_password(pipeline):
    env = pipeline.env(DASHBOARD_PORT=str(free_port()))
    env.pop("DASHBOARD_PASSWORD", None)
    run = subprocess.run(
        [sys.executable, "dashboard.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert "DASHBOARD_PASSWORD" in run.stderr


def _procfile() -> dict[str, list[str]]:
    """The Procfile's commands by process name, ``python`` being this interpreter."""
    commands = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if command.strip():
            args = shlex.split(command)
            commands[name.strip()] = [sys.executable, *args[1:]] if args[0] == "python" else args
    return commands


def test_procfile_dashboard_and_workers_share_the_embedded_redis_and_the_port_comes_from_the_settings(tmp_path):
    """The Procfile's worker and dashboard started at once, as honcho does, with REDIS_URL unset: the dashboard
    answers on DASHBOARD_PORT and shows the pool's workers, so both are on the one embedded server under
    DATA_DIR; after SIGTERM to the worker, then to the dashboard, no redis-server is left."""
    data_dir, port = tmp_path / "data", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL") and not k.endswith("_KEY")}
    env.update(
        DATA_DIR=str(data_dir),
        METRICS_PORT="0",
        LOG_LEVEL="WARNING",
        DASHBOARD_PORT=str(port),
        DASHBOARD_PASSWORD=PASSWORD,
        PYTHONPATH=str(ROOT),
    )
    commands = _procfile()
    started = [
        subprocess.Popen(
            commands[name], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        for name in ("worker", "dashboard")
    ]
    worker, dashboard = started
    url = f"http://127.0.0.1:{port}/0/data/workers.json"

    def workers_shown() -> list[dict]:
        assert worker.poll() is None and dashboard.poll() is None, (
            worker.stderr.read() if worker.poll() is not None else dashboard.stderr.read()
        ).decode()[-2000:]
        status, body = _get(url)
        return json.loads(body)["workers"] if status == 200 else []

    try:
        processes.wait_for(lambda: len(workers_shown()) == 2, 60, "the dashboard to show the pool's 2 workers")
        assert len(processes.redis_servers_in(data_dir)) == 1
    finally:
        for process in started:  # the dashboard last: it holds the server's last client
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                processes.kill_tree(process)
    processes.wait_for(lambda: processes.redis_servers_in(data_dir) == [], 15, "the embedded redis-server to stop")
