"""The RQ job a scheduled firing enqueues: submit one named run from the runs file, idempotently."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rq import get_current_job

from jobs.process_chunk import worker_settings
from pipeline import runs, store
from pipeline.queue import connect
from pipeline.schedules import firing_key, load_runs_file


def submit_named_run(runs_file: str, name: str) -> dict[str, Any]:
    settings = worker_settings()
    job = get_current_job()
    connection = job.connection if job is not None else connect(settings)
    fired_at = (job.enqueued_at if job is not None and job.enqueued_at else datetime.now(timezone.utc))
    named = load_runs_file(Path(runs_file), settings.allowed_data_dir)[name]
    request = replace(named.request, idempotency_key=firing_key(named, fired_at))
    record = store.open_engine(settings.resolved_database_url)  # SQL, if Redis lost a run it has done
    try:
        report = runs.submit(connection, settings, request, engine=record)
    finally:
        record.dispose()
    return report.__dict__
