"""The collector process starts while its database is down: it serves /metrics at once and writes the waiting
results when the database answers (a PostgreSQL reached through a TCP proxy the test takes down and up)."""

from __future__ import annotations

import urllib.error

import pytest
from sqlalchemy.engine import make_url

from . import processes
from .datasets import tricky_rows, write
from .ports import free_port
from .tcpproxy import TcpProxy
from .test_metrics import scrape, total


def _scrape_or_none(port: int):
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_collector_starts_with_the_database_down_and_writes_once_it_answers(pipeline, tmp_path):
    first = pipeline.submit(write(tmp_path / "a.csv", tricky_rows(20)), "Q: {{ text }}", chunk_size=10)
    pipeline.work()  # workers need only Redis: 20 results wait in the stream
    url = make_url(pipeline.settings.resolved_database_url)
    proxy = TcpProxy(url.host, url.port)  # not listening yet: the database "does not answer"
    port = free_port()
    env = pipeline.env(
        DATABASE_URL=url.set(port=proxy.port).render_as_string(hide_password=False),
        METRICS_PORT=str(port),
        METRICS_HOST="127.0.0.1",
    )
    collector = processes.start(["enqueue.py", "collect"], env)
    try:
        processes.wait_for(
            lambda: _scrape_or_none(port) is not None or collector.poll() is not None,
            60,
            "/metrics of the collector started with its database down",
        )
        assert collector.poll() is None, collector.stderr.read().decode()
        down = scrape(port)
        assert total(down, "pipeline_database_up") == 0
        assert total(down, "pipeline_handoff_backlog") == 21  # the run event and its 20 results

        proxy.up()
        processes.wait_for(
            lambda: total(scrape(port), "pipeline_handoff_backlog") == 0,
            120,
            "the collector to write the backlog once the database answers",
        )
        assert pipeline.run_row(first.run_id)["rows_succeeded"] == 20
        up = scrape(port)
        assert total(up, "pipeline_database_up") == 1
        assert total(up, "pipeline_last_write_timestamp_seconds") > 0
        assert total(up, "pipeline_run_rows", run=first.run_id, status="succeeded") == 20

        proxy.down()  # the database is cut while the collector runs: /metrics keeps answering
        second = pipeline.submit(write(tmp_path / "b.csv", tricky_rows(5)), "Q: {{ text }}")
        pipeline.work()
        processes.wait_for(
            lambda: total(scrape(port), "pipeline_database_up") == 0, 60, "/metrics to report the database down"
        )
        cut = scrape(port)
        assert total(cut, "pipeline_handoff_backlog") >= 6  # the second run waits in Redis
        assert collector.poll() is None

        proxy.up()
        processes.wait_for(
            lambda: total(scrape(port), "pipeline_handoff_backlog") == 0, 120, "the collector to catch up after the cut"
        )
        assert pipeline.run_row(second.run_id)["rows_succeeded"] == 5
    finally:
        collector.terminate()
        collector.wait(timeout=30)
        proxy.close()
