"""rq-dashboard starts against the pipeline's Redis and shows its queue (smoke test over HTTP)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from . import processes
from .datasets import tricky_rows, write


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> bytes | None:
    try:
        return urllib.request.urlopen(url, timeout=2).read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_rq_dashboard_lists_the_pipeline_queue(pipeline, tmp_path):
    pipeline.submit(write(tmp_path / "d.csv", tricky_rows(5)), "Q: {{ text }}")
    port = _free_port()
    dashboard = Path(sys.executable).parent / "rq-dashboard"
    process = subprocess.Popen([str(dashboard), "--json", "--redis-url", pipeline.settings.redis_url,
                                "--bind", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        processes.wait_for(lambda: _get(f"{url}/0/data/queues.json") is not None or process.poll() is not None,
                           30, "rq-dashboard to answer", interval=0.1)
        assert process.poll() is None, process.stderr.read().decode()
        queues = {q["name"]: q for q in json.loads(_get(f"{url}/0/data/queues.json"))["queues"]}
        assert queues[pipeline.settings.queue_name]["count"] == 1
        page = _get(f"{url}/0/view/queues")
        assert page is not None and b"RQ" in page
    finally:
        process.terminate()
        process.wait(timeout=10)
