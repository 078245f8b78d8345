"""The JSON API under /api/v1: submit an upload, list and read runs, download results, cancel / resume /
retry-failed. Every view is a call into ``actions`` (and through it the CLI's functions)."""

from __future__ import annotations

from typing import Any

from apiflask import APIBlueprint
from flask import Response
from flask_jwt_extended import current_user, jwt_required
from flask_limiter import Limiter

from pipeline import users

from . import actions
from .auth import API_SECURITY, caller_key
from .schemas import ActionOut, PageQuery, ResultsQuery, ResumeIn, RunDetail, RunsPage, SubmitIn, SubmitOut

RESULT_CONTENT = {
    mimetype: {"schema": {"type": "string", "format": "binary"}} for mimetype in actions.MIMETYPES.values()
}
# A description string gets the error body schema, a dict is the whole response object. APIFlask takes both in one
# mapping though its ResponsesType says one or the other, hence the Any.
RESULTS_RESPONSES: dict[int, Any] = {
    200: {"description": "The results file", "content": RESULT_CONTENT},
    401: "Unauthorized",
    404: "Not found",
    409: "No results in the database yet",
}


def build_blueprint(services: actions.Services, limiter: Limiter, submit_limit: str) -> APIBlueprint:
    bp = APIBlueprint("api", __name__, url_prefix="/api/v1", tag="Runs")

    @bp.post("/runs")
    @limiter.limit(submit_limit, key_func=caller_key)
    @jwt_required(locations=["headers"])
    @bp.input(SubmitIn, location="form_and_files")
    @bp.output(SubmitOut, status_code=201, description="The run was created (200: the same run existed).")
    @bp.doc(
        summary="Submit a dataset",
        description="Multipart upload of a CSV, JSONL or Parquet file with the "
        "run's settings, validated exactly as `enqueue.py submit` validates it: a bad row or column is a 422 "
        "naming it, and nothing is enqueued. The same content and settings, or the same idempotency key, "
        "give the same run.",
        responses={
            200: "The same run existed already",
            401: "Unauthorized",
            413: "Body too large",
            415: "Not a dataset file",
            422: "Invalid dataset or settings",
            429: "Too many submits",
        },
        security=API_SECURITY,
    )
    def submit(form_and_files_data: dict[str, Any]) -> tuple[dict[str, Any], int]:
        report = actions.submit_upload(services, current_user, form_and_files_data["file"], form_and_files_data)
        return report.__dict__, 200 if report.existing else 201

    @bp.get("/runs")
    @jwt_required(locations=["headers"])
    @bp.input(PageQuery, location="query")
    @bp.output(RunsPage)
    @bp.doc(summary="List your runs", description="Newest first, paged.", responses=[401], security=API_SECURITY)
    def list_runs(query_data: dict[str, Any]) -> dict[str, Any]:
        return actions.runs_page(services, current_user, query_data["page"], query_data["per_page"])

    @bp.get("/runs/<string:run_id>")
    @jwt_required(locations=["headers"])
    @bp.output(RunDetail)
    @bp.doc(
        summary="A run's status",
        description="Counts, tokens, cost and timings.",
        responses=[401, 404],
        security=API_SECURITY,
    )
    def get_run(run_id: str) -> dict[str, Any]:
        info = actions.visible_status(services, current_user, run_id)
        return {**info, "filename": users.run_filenames(services.engine, [run_id]).get(run_id)}

    @bp.get("/runs/<string:run_id>/results")
    @jwt_required(locations=["headers"])
    @bp.input(ResultsQuery, location="query")
    @bp.doc(
        summary="Download results",
        description="Input columns joined with the answers, as `enqueue.py "
        "export` writes them (CSV cells that a spreadsheet would run as formulas are escaped unless raw).",
        responses=RESULTS_RESPONSES,
        security=API_SECURITY,
    )
    def results(run_id: str, query_data: dict[str, Any]) -> Response:
        fmt = query_data["format"]
        return actions.download(services, current_user, run_id, fmt, query_data["raw"])

    @bp.post("/runs/<string:run_id>/cancel")
    @jwt_required(locations=["headers"])
    @bp.output(ActionOut)
    @bp.doc(summary="Cancel a run", responses=[401, 404, 409], security=API_SECURITY)
    def cancel(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "jobs": actions.cancel(services, current_user, run_id)}

    @bp.post("/runs/<string:run_id>/resume")
    @jwt_required(locations=["headers"])
    @bp.input(ResumeIn, location="json")
    @bp.output(ActionOut)
    @bp.doc(
        summary="Resume a run",
        description="Enqueues every row without a result.",
        responses=[401, 404, 409],
        security=API_SECURITY,
    )
    def resume(run_id: str, json_data: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": run_id, "jobs": actions.resume(services, current_user, run_id, json_data.get("max_cost"))}

    @bp.post("/runs/<string:run_id>/retry-failed")
    @jwt_required(locations=["headers"])
    @bp.output(ActionOut)
    @bp.doc(summary="Retry the failed rows", responses=[401, 404, 409], security=API_SECURITY)
    def retry_failed(run_id: str) -> dict[str, Any]:
        return {"run_id": run_id, "jobs": actions.retry_failed(services, current_user, run_id)}

    return bp
