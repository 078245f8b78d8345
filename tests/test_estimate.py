"""submit --dry-run: what a run will cost, before it spends, against what the run then really cost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import SecretStr

from pipeline.control import runs
from pipeline.pricing import NANO

from .datasets import tricky_rows, write
from .processes import ROOT

TEMPLATE = "Q: {{ text }}"


@pytest.fixture
def database_url(tmp_path):
    """The estimate reads no SQL; the run it is compared with needs one database."""
    return f"sqlite:///{tmp_path / 'results.db'}"


def test_dry_run_prices_the_run_and_enqueues_nothing(pipeline, tmp_path, capsys):
    from enqueue import print_estimate

    unique = tricky_rows(48)
    rows = unique + [{"id": f"dup-{i}", "text": unique[i]["text"]} for i in range(12)]  # 12 repeated prompts
    dataset = write(tmp_path / "d.csv", rows)
    request = runs.RunRequest(dataset=dataset, template=TEMPLATE, id_column="id", chunk_size=10)
    estimate = runs.dry_run(pipeline.redis, pipeline.settings, request)
    assert pipeline.redis.dbsize() == 0  # nothing enqueued or stored
    assert (estimate.rows, estimate.rows_cached, estimate.seconds) == (60, 12, None)

    cli = subprocess.run(
        [
            sys.executable,
            "enqueue.py",
            "submit",
            str(dataset),
            "-t",
            TEMPLATE,
            "--id-column",
            "id",
            "--rpm",
            "600",
            "--dry-run",
            "--json",
        ],
        cwd=ROOT,
        env=pipeline.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    limited = json.loads(cli.stdout)
    assert limited["seconds"] == round(48 * 60 / (600 * 0.99), 1) and limited["rows_cached"] == 12
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 0

    report = runs.submit(pipeline.redis, pipeline.settings, request)
    pipeline.work()
    pipeline.collect()
    run = pipeline.run_row(report.run_id)
    assert (run["status"], run["rows_cached"]) == ("completed", estimate.rows_cached)
    assert 0 < run["cost_nano"] <= estimate.cost_usd * NANO
    assert run["input_tokens"] <= estimate.input_tokens and run["output_tokens"] <= estimate.output_tokens
    with capsys.disabled():
        print(
            f"estimate: {estimate.rows_cached} cached, {estimate.input_tokens} in / {estimate.output_tokens} out, "
            f"${estimate.cost_usd:.6f}; run: {run['rows_cached']} cached, {run['input_tokens']} in / "
            f"{run['output_tokens']} out, ${run['cost_nano'] / NANO:.6f}"
        )

    again = runs.dry_run(pipeline.redis, pipeline.settings, request)  # every answer is cached now
    assert (again.rows_cached, again.cost_usd) == (60, 0.0)

    pipeline.settings = pipeline.settings.model_copy(update={"openai_api_key": SecretStr("sk-test")})
    unknown = runs.dry_run(
        pipeline.redis,
        pipeline.settings,
        runs.RunRequest(dataset=dataset, template=TEMPLATE, id_column="id", provider="openai", model="in-house-model"),
    )
    assert unknown.cost_usd is None
    capsys.readouterr()
    print_estimate(unknown, as_json=False)
    out = capsys.readouterr().out
    assert "unknown price" in out and "60:" in out and "nothing enqueued" in out
