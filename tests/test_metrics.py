"""/metrics scraped over HTTP during and after a real run, checked against the SQL tables."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.collect.collector import Collector
from pipeline.collect.metrics import PipelineMetrics

from .conftest import ROOT
from .datasets import tricky_rows, write


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def test_metrics_agree_with_sql_during_and_after_a_run(make_pipeline, tmp_path):
    pipeline = make_pipeline(fake_latency=0.02, worker_concurrency=8)
    report = pipeline.submit(
        write(tmp_path / "d.csv", tricky_rows(300)), "Classify: {{ text }}", id_column="id", chunk_size=50
    )
    metrics = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine)
    server, _ = metrics.serve(0, addr="127.0.0.1")
    port = server.server_port
    before = scrape(port)
    assert total(before, "pipeline_queue_jobs", state="queued") == 6
    assert total(before, "pipeline_workers") == 0

    stop = threading.Event()
    collector = Collector(pipeline.settings, pipeline.redis, pipeline.engine, observers=[metrics.observe])
    thread = threading.Thread(target=collector.run, kwargs={"stop": stop.is_set})
    thread.start()
    worker = subprocess.Popen(
        [sys.executable, "worker.py", "--burst", "--processes", "2"], cwd=ROOT, env=pipeline.env()
    )
    try:
        during = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            samples = scrape(port)
            written = total(samples, "pipeline_results_total")
            if 0 < written < 300:
                during = samples
                break
            if written >= 300:
                break
            time.sleep(0.02)
        assert worker.wait(timeout=120) == 0
        deadline = time.monotonic() + 30
        while pipeline.run_row(report.run_id)["rows_succeeded"] < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
        worker.kill()
    after = scrape(port)
    server.shutdown()

    if during is not None:  # mid-run: the counters never run ahead of what SQL holds
        assert total(during, "pipeline_results_total") <= 300
        assert total(during, "pipeline_run_rows", run=report.run_id, status="succeeded") <= 300
    run = pipeline.run_row(report.run_id)
    results = pipeline.results(report.run_id)
    assert total(after, "pipeline_results_total", status="succeeded") == run["rows_succeeded"] == 300
    assert total(after, "pipeline_run_rows", run=report.run_id, status="succeeded") == 300
    assert total(after, "pipeline_run_rows", run=report.run_id, status="failed") == 0
    assert total(after, "pipeline_run_rows", run=report.run_id, status="pending") == 0
    assert total(after, "pipeline_tokens_total", direction="in") == run["input_tokens"]
    assert total(after, "pipeline_tokens_total", direction="out") == run["output_tokens"]
    assert total(after, "pipeline_cost_usd_total") == pytest.approx(run["cost_nano"] / 1e9)
    assert total(after, "pipeline_cache_hits_total") == run["rows_cached"]
    assert total(after, "pipeline_provider_requests_total", code="200") == run["attempts"]
    assert total(after, "pipeline_row_latency_seconds_count") == 300 == len(results)
    assert total(after, "pipeline_queue_jobs", state="queued") == 0
    assert total(after, "pipeline_handoff_backlog") == 0
    assert total(after, "pipeline_runs", status="completed") == 1


def test_dashboard_and_alerts_use_only_metrics_the_collector_exports(pipeline, tmp_path):
    import re

    from .conftest import ROOT

    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(3)), "Q: {{ text }}")
    pipeline.work()
    metrics = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine)
    Collector(pipeline.settings, pipeline.redis, pipeline.engine, observers=[metrics.observe]).run(burst=True)
    assert pipeline.run_row(report.run_id)["status"] == "completed"
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {
        family.name + suffix for family in metrics.registry.collect() for suffix in suffixes.get(family.type, [""])
    }  # declared, even before a first sample
    deploy = ROOT / "deploy"
    used = set()
    for name in ("grafana-dashboard.json", "prometheus-alerts.yml"):
        used |= set(re.findall(r"\bpipeline_[a-z_]+", (deploy / name).read_text(encoding="utf-8")))
    missing = {name for name in used if name not in exported}
    assert not missing, f"deploy/ refers to metrics nobody exports: {sorted(missing)}"
    assert len(used) >= 10


def test_a_runs_counter_series_exist_at_zero_before_its_first_result(pipeline, tmp_path):
    """rate()/increase() lose a counter's first value when its series appears with it: the run event alone
    creates every provider/model series of the run (fallbacks too) at zero."""
    report = pipeline.submit(write(tmp_path / "d.csv", tricky_rows(4)), "Q: {{ text }}", fallbacks=["fake:backup"])
    metrics = PipelineMetrics(pipeline.settings, pipeline.redis, pipeline.engine)
    Collector(pipeline.settings, pipeline.redis, pipeline.engine, observers=[metrics.observe]).run(burst=True)
    assert pipeline.run_row(report.run_id)["rows_succeeded"] == 0  # the run is known, no result yet
    server, _ = metrics.serve(0)
    try:
        before = scrape(server.server_port)
        pipeline.work()
        Collector(pipeline.settings, pipeline.redis, pipeline.engine, observers=[metrics.observe]).run(burst=True)
        after = scrape(server.server_port)
    finally:
        server.shutdown()
    for model in ("fake", "backup"):
        for name, labels in [
            ("pipeline_results_total", {"status": "failed"}),
            ("pipeline_results_total", {"status": "succeeded"}),
            ("pipeline_provider_requests_total", {"code": "429"}),
            ("pipeline_provider_requests_total", {"code": "200"}),
            ("pipeline_rate_limited_total", {}),
            ("pipeline_cache_hits_total", {}),
            ("pipeline_retries_total", {}),
            ("pipeline_timeouts_total", {}),
            ("pipeline_cost_usd_total", {}),
            ("pipeline_tokens_total", {"direction": "in"}),
            ("pipeline_row_latency_seconds_count", {}),
        ]:
            key = (name, tuple(sorted({"provider": "fake", "model": model, **labels}.items())))
            assert before.get(key) == 0, f"{key} missing or not zero before the first result"
    assert total(after, "pipeline_results_total", model="fake", status="succeeded") == 4
    assert total(before, "pipeline_last_write_timestamp_seconds") > 0
    assert total(before, "pipeline_database_up") == 1


def test_metrics_are_served_from_redis_while_the_database_is_down(pipeline, tmp_path):
    """A scrape whose SQL query fails still answers 200: Redis's view, and pipeline_database_up 0."""
    from sqlalchemy import create_engine

    pipeline.submit(write(tmp_path / "d.csv", tricky_rows(5)), "Q: {{ text }}", chunk_size=2)
    pipeline.work()
    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    metrics = PipelineMetrics(pipeline.settings, pipeline.redis, dead)
    server, _ = metrics.serve(0)
    try:
        samples = scrape(server.server_port)
    finally:
        server.shutdown()
        dead.dispose()
    assert total(samples, "pipeline_database_up") == 0
    assert total(samples, "pipeline_handoff_backlog") == 6  # the run event and 5 results
    assert total(samples, "pipeline_queue_jobs", state="queued") == 0
    assert ("pipeline_workers", (("queue", pipeline.settings.queue_name),)) in samples
    assert not any(name == "pipeline_run_rows" for name, _ in samples)
