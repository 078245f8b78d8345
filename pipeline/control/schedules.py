"""Named runs from a runs file (TOML), and their schedule on RQ's own cron scheduler.

A runs file lists named runs::

    [runs.nightly]
    dataset = "reviews.csv"          # relative to the runs file
    template_file = "sentiment.j2"   # or: template = "..."
    provider = "fake"
    model = "fake"
    id_column = "id"
    max_cost = 5.0
    cron = "0 2 * * *"               # or: every = 3600 (seconds)

Each firing submits with the idempotency key ``NAME@SLOT`` (the scheduled time it belongs to), so a double
trigger, from two schedulers or a cron line plus the scheduler, starts one run. The scheduler submits in its own
process: the files are read where the runs file is, and workers get the rows in the chunk jobs.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from croniter import croniter
from redis import Redis
from rq.cron import CronJob, CronScheduler

from pipeline.collect import store
from pipeline.control import runs
from pipeline.control.runs import RunRequest, SubmitReport
from pipeline.errors import ConfigError, PipelineError
from pipeline.intake.userfiles import read_text
from pipeline.settings import Settings

log = logging.getLogger("pipeline.schedule")


@dataclass(frozen=True)
class NamedRun:
    name: str
    request: RunRequest
    cron: str | None = None
    every: int | None = None


def load_runs_file(path: Path, allowed_dir: Path | None = None) -> dict[str, NamedRun]:
    """The runs file's named runs; ``allowed_dir`` (ALLOWED_DATA_DIR) bounds the template files it names (its
    datasets are checked by submit)."""
    text = read_text(path, "runs file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    entries = data.get("runs")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: no [runs.NAME] tables")
    return {name: _named_run(path, name, entry, allowed_dir) for name, entry in entries.items()}


_REQUEST_FIELDS = {f.name for f in fields(RunRequest)} - {"dataset", "template", "name", "idempotency_key"}


def _named_run(path: Path, name: str, entry: dict[str, Any], allowed_dir: Path | None) -> NamedRun:
    where = f"{path}: [runs.{name}]"
    entry = dict(entry)
    cron, every = entry.pop("cron", None), entry.pop("every", None)
    if cron is not None and not croniter.is_valid(cron):
        raise ConfigError(f"{where}: invalid cron expression {cron!r}")
    if "dataset" not in entry:
        raise ConfigError(f"{where}: missing 'dataset'")
    base = path.parent
    dataset = base / entry.pop("dataset")
    template = entry.pop("template", None)
    template_file = entry.pop("template_file", None)
    if (template is None) == (template_file is None):
        raise ConfigError(f"{where}: give exactly one of 'template' or 'template_file'")
    if template_file is not None:
        template = read_text(base / template_file, f"[runs.{name}] template_file", allowed_dir)
    unknown = set(entry) - _REQUEST_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    request = RunRequest(dataset=dataset, template=template, name=name, **entry)
    return NamedRun(name=name, request=request, cron=cron, every=int(every) if every else None)


def firing_key(run: NamedRun, at: datetime) -> str:
    """The idempotency key of the firing that ``at`` belongs to: the schedule slot at or before ``at``."""
    at = at.astimezone(UTC)
    if run.cron:
        local = at.astimezone().replace(tzinfo=None)
        slot = croniter(run.cron, local).get_prev(datetime) if not croniter.match(run.cron, local) else local
        slot = slot.replace(second=0, microsecond=0)
        return f"{run.name}@{slot.isoformat(timespec='minutes')}"
    if run.every:
        slot = int(at.timestamp()) // run.every * run.every
        return f"{run.name}@{datetime.fromtimestamp(slot, UTC).isoformat()}"
    return f"{run.name}@{at.date().isoformat()}"


def fire(connection: Redis, settings: Settings, runs_file: Path, name: str, at: datetime) -> SubmitReport | None:
    """One firing: submit the named run, read afresh from the runs file, with the key of the slot ``at`` is in.

    A firing that cannot submit (a missing dataset, a bad row, a run gone from the file) logs one line and
    returns None: the scheduler goes on, and the next slot tries again."""
    try:
        named = load_runs_file(runs_file, settings.allowed_data_dir).get(name)
        if named is None:
            raise ConfigError(f"{runs_file}: no run named {name!r} any more")
        request = replace(named.request, idempotency_key=firing_key(named, at))
        record = store.open_engine(settings.resolved_database_url)  # SQL, if Redis lost a run it has done
        try:
            report = runs.submit(connection, settings, request, engine=record)
        finally:
            record.dispose()
    except PipelineError as exc:
        log.error("scheduled run %s not submitted: %s", name, exc)
        return None
    log.info(
        "scheduled run %s: %s run %s, %d jobs enqueued",
        name,
        "existing" if report.existing else "new",
        report.run_id,
        report.jobs_enqueued,
    )
    return report


class FiringCronJob(CronJob):
    """A named run's schedule on RQ's cron scheduler. A firing submits the run here, in the scheduler's process,
    which reads the runs file and the dataset; the rows reach the workers inside the chunk jobs' payloads, so
    worker hosts never read a file (RQ's CronJob would enqueue a job that a worker runs)."""

    def __init__(self, settings: Settings, runs_file: Path, run: NamedRun) -> None:
        super().__init__(
            queue_name=settings.queue_name,
            func_name=f"{__name__}.fire",
            cron=run.cron,
            interval=run.every,
            name=f"pipeline:{run.name}",
        )
        self.settings = settings
        self.runs_file = runs_file
        self.run_name = run.name

    def enqueue(self, connection: Redis) -> None:  # type: ignore[override]
        fire(connection, self.settings, self.runs_file, self.run_name, datetime.now(UTC))


class PipelineCronScheduler(CronScheduler):
    def add(self, job: CronJob) -> None:
        self._cron_jobs.append(job)


def build_scheduler(connection: Redis, settings: Settings, runs_file: Path) -> PipelineCronScheduler:
    """A CronScheduler with one entry per scheduled named run (runs without cron/every are skipped)."""
    scheduler = PipelineCronScheduler(connection=connection, name=f"pipeline-cron:{runs_file.name}")
    runs_file = runs_file.resolve()
    for run in load_runs_file(runs_file, settings.allowed_data_dir).values():
        if run.cron or run.every:
            scheduler.add(FiringCronJob(settings, runs_file, run))
    if not scheduler.get_jobs():
        raise ConfigError(f"{runs_file}: no run has a 'cron' or 'every' schedule")
    return scheduler
