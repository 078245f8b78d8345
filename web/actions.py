"""What a web request does with runs, shared by the API and the pages: each is a call to ``pipeline.control.runs`` /
``pipeline.output.export`` (the CLI's own functions) with the caller's ownership checked first.

A user sees only runs they own; reading, cancelling or downloading anyone else's run answers 404, exactly as
for a run that does not exist. Admins see every run, the CLI's (owner None) included.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis
from apiflask import HTTPError
from flask import Response, send_file, stream_with_context
from sqlalchemy import Engine
from werkzeug.datastructures import FileStorage

from pipeline import users
from pipeline.collect import store
from pipeline.control import runs
from pipeline.control.runstate import load_config
from pipeline.errors import ConfigError, PipelineError, RunNotFound
from pipeline.output.export import STREAM_FORMATS, export_chunks, export_run
from pipeline.settings import Settings

from .problems import problem
from .uploads import display_name, store_upload

RUN_ID = re.compile(r"r[0-9a-f]{15}")
MIMETYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    engine: Engine

    @property
    def upload_dir(self) -> Path:
        return (self.settings.data_dir / "uploads").resolve()

    @property
    def export_dir(self) -> Path:
        path = (self.settings.data_dir / "exports").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path


def not_found(run_id: str) -> HTTPError:
    return problem(404, f"no run {run_id!r}", "Not Found")


def submit_upload(
    services: Services, user: dict[str, Any], upload: FileStorage, fields: dict[str, Any]
) -> runs.SubmitReport:
    """Store the upload, then ``runs.submit`` it as the CLI does: a bad file or option is a 422 naming the row
    or column (with the client's file name in place of the stored one), and nothing is enqueued."""
    filename = display_name(upload.filename)
    path = store_upload(upload, services.upload_dir)
    try:
        request = build_request(path, fields, owner=user["name"])
        report = runs.submit(services.redis, services.settings, request)
    except PipelineError as exc:
        path.unlink(missing_ok=True)
        message = str(exc).replace(str(path), filename).replace(str(path.resolve()), filename)
        raise problem(422, message, "Unprocessable Content") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if report.existing and Path(load_config(services.redis, report.run_id).dataset) != path:
        path.unlink(missing_ok=True)  # the run reads the copy its first submit stored
    users.record_run(services.engine, report.run_id, user["name"], filename)
    return report


def build_request(path: Path, fields: dict[str, Any], owner: str) -> runs.RunRequest:
    provider = fields.get("provider") or "fake"
    model = runs.model_for(provider, fields.get("model"))
    return runs.RunRequest(
        dataset=path,
        template=fields["template"],
        provider=provider,
        model=model,
        system_prompt=fields.get("system") or None,
        temperature=fields.get("temperature"),
        max_tokens=fields.get("max_tokens", 256),
        params=_json_object(fields.get("params"), "params"),
        json_schema=_json_object(fields.get("json_schema"), "json_schema") if fields.get("json_schema") else None,
        fallbacks=list(fields.get("fallback") or []),
        id_column=fields.get("id_column") or None,
        chunk_size=fields.get("chunk_size"),
        max_cost=fields.get("max_cost"),
        price_in=fields.get("price_in"),
        price_out=fields.get("price_out"),
        use_cache=not fields.get("no_cache", False),
        rpm=fields.get("rpm"),
        tpm=fields.get("tpm"),
        name=fields.get("name") or None,
        idempotency_key=fields.get("idempotency_key") or None,
        mode=fields.get("mode") or "online",
        owner=owner,
    )


def _json_object(text: str | None, field: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{field}: not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: expected a JSON object")
    return value


def visible_status(services: Services, user: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The run's status (``runs.run_status``) if the user may see it; 404 otherwise."""
    if not RUN_ID.fullmatch(run_id):  # what runs.validate makes; anything else never reaches Redis or SQL
        raise not_found(run_id)
    try:
        info = runs.run_status(services.redis, services.engine, run_id)
    except RunNotFound:
        raise not_found(run_id) from None
    if not user["is_admin"] and info["owner"] != user["name"]:
        raise not_found(run_id)
    return with_progress(info)


def with_progress(info: dict[str, Any]) -> dict[str, Any]:
    done = info["rows_succeeded"] + info["rows_failed"]
    running = info["status"] not in store.FINAL_STATUSES and info["status"] != runs.CANCELLED
    info["eta_s"] = (
        round(info["elapsed_s"] * info["rows_pending"] / done, 1)
        if running and done and info["rows_pending"]
        else (0.0 if not running else None)
    )
    return info


def runs_page(services: Services, user: dict[str, Any], page: int, per_page: int) -> dict[str, Any]:
    owner = None if user["is_admin"] else user["name"]
    run_ids, total = users.page_run_ids(services.engine, owner, (page - 1) * per_page, per_page)
    names = users.run_filenames(services.engine, run_ids)
    items = []
    for run_id in run_ids:
        try:
            info = with_progress(runs.run_status(services.redis, services.engine, run_id))
        except RunNotFound:  # indexed but its state is gone everywhere: nothing to show
            continue
        info["filename"] = names.get(run_id)
        items.append(info)
    return {"items": items, "page": page, "per_page": per_page, "total": total}


def cancel(services: Services, user: dict[str, Any], run_id: str) -> int:
    visible_status(services, user, run_id)
    return _requeue(lambda: runs.cancel(services.redis, services.settings, run_id), run_id)


def resume(services: Services, user: dict[str, Any], run_id: str, max_cost: float | None) -> int:
    visible_status(services, user, run_id)
    return _requeue(
        lambda: runs.resume(services.redis, services.settings, run_id, max_cost=max_cost, engine=services.engine),
        run_id,
    )


def retry_failed(services: Services, user: dict[str, Any], run_id: str) -> int:
    visible_status(services, user, run_id)
    return _requeue(lambda: runs.retry_failed(services.redis, services.settings, services.engine, run_id), run_id)


def _requeue(action, run_id: str) -> int:
    try:
        return action()
    except RunNotFound:
        raise not_found(run_id) from None
    except PipelineError as exc:  # busy (jobs still queued), dataset gone, no price for a new budget
        raise problem(409, str(exc), "Conflict") from None


def download(services: Services, user: dict[str, Any], run_id: str, fmt: str, raw: bool) -> Response:
    """The run's results as an attachment, exactly what ``enqueue.py export`` writes. CSV and JSONL stream
    from the database page by page; the run is checked (404 / 409) before the response starts."""
    visible_status(services, user, run_id)
    if fmt in STREAM_FORMATS:
        try:
            chunks = export_chunks(services.engine, run_id, fmt, raw=raw)
        except ConfigError as exc:  # nothing in SQL yet (the collector has not written the run)
            raise problem(409, str(exc), "Conflict") from None
        response = Response(stream_with_context(chunks), mimetype=MIMETYPES[fmt])
        response.headers.set("Content-Disposition", "attachment", filename=download_name(run_id, fmt))
        return response
    return send_file(
        _export_file(services, run_id, fmt, raw),
        mimetype=MIMETYPES[fmt],
        as_attachment=True,
        download_name=download_name(run_id, fmt),
    )


def _export_file(services: Services, run_id: str, fmt: str, raw: bool) -> IO[bytes]:
    """The run's results written by ``export_run`` into an unlinked temporary file, open for reading (Parquet:
    its footer is written last, so it cannot stream): its disk space goes when the response closes it."""
    fd, name = tempfile.mkstemp(dir=services.export_dir, prefix=f"{run_id}-", suffix=f".{fmt}")
    os.close(fd)
    try:
        export_run(services.engine, run_id, fmt, Path(name), raw=raw)
        return open(name, "rb")
    except ConfigError as exc:  # nothing in SQL yet (the collector has not written the run)
        raise problem(409, str(exc), "Conflict") from None
    finally:
        os.unlink(name)


def download_name(run_id: str, fmt: str) -> str:
    return f"{run_id}-{time.strftime('%Y%m%d')}.{fmt}"
