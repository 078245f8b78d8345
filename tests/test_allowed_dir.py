"""ALLOWED_DATA_DIR bounds every file a submit reads: the dataset, a template file (given on the command line or
named by a runs file) and a JSON schema file. A template's text goes to the provider, so reading a file outside
would leak it."""

from __future__ import annotations

import subprocess

import pytest

from .datasets import tricky_rows, write
from .processes import cli


@pytest.fixture
def database_url(tmp_path):
    return f"sqlite:///{tmp_path / 'results.db'}"


def submit(pipeline, allowed, *args: str) -> subprocess.CompletedProcess:
    return cli(pipeline, "submit", *args, ALLOWED_DATA_DIR=str(allowed))


@pytest.fixture
def files(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    write(allowed / "d.csv", tricky_rows(3))
    (allowed / "ok.j2").write_text("Q: {{ text }}", encoding="utf-8")
    (allowed / "schema.json").write_text('{"type": "object"}', encoding="utf-8")
    (tmp_path / "secret.j2").write_text("{{ text }} API_KEY=do-not-send", encoding="utf-8")
    (tmp_path / "schema.json").write_text('{"type": "object"}', encoding="utf-8")
    return allowed


def _refused(run: subprocess.CompletedProcess, pipeline, name: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert name in line and "outside the allowed data directory" in line, line
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 0


def test_template_and_schema_files_outside_the_allowed_dir_are_refused(pipeline, files):
    dataset = str(files / "d.csv")
    _refused(submit(pipeline, files, dataset, "--template-file", str(files / "../secret.j2")), pipeline, "secret.j2")
    _refused(
        submit(pipeline, files, dataset, "-t", "{{ text }}", "--json-schema", str(files.parent / "schema.json")),
        pipeline,
        "schema.json",
    )
    (files / "runs.toml").write_text(
        '[runs.leak]\ndataset = "d.csv"\ntemplate_file = "../secret.j2"\n', encoding="utf-8"
    )
    _refused(submit(pipeline, files, "--config", str(files / "runs.toml"), "--name", "leak"), pipeline, "secret.j2")


def test_files_inside_the_allowed_dir_are_accepted(pipeline, files):
    (files / "runs.toml").write_text('[runs.ok]\ndataset = "d.csv"\ntemplate_file = "ok.j2"\n', encoding="utf-8")
    named = submit(pipeline, files, "--config", str(files / "runs.toml"), "--name", "ok")
    assert named.returncode == 0, named.stderr
    direct = submit(
        pipeline,
        files,
        str(files / "d.csv"),
        "--template-file",
        str(files / "ok.j2"),
        "--json-schema",
        str(files / "schema.json"),
    )
    assert direct.returncode == 0, direct.stderr
    assert pipeline.redis.llen(f"rq:queue:{pipeline.settings.queue_name}") == 2
