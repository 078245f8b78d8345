"""Errors as RFC 9457 problem details (``application/problem+json``), for every error the API answers."""

from __future__ import annotations

from typing import Any

from apiflask import HTTPError
from flask import Response, json
from werkzeug.datastructures import Headers

PROBLEM_TYPE = "application/problem+json"

# The OpenAPI schema of every error body (HTTP_ERROR_SCHEMA and VALIDATION_ERROR_SCHEMA).
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {"type": "object", "description": "Field errors of a request that failed validation."},
    },
}


def problem(status: int, detail: str, title: str | None = None, headers: dict[str, str] | None = None) -> HTTPError:
    """An HTTPError that the error processor turns into a problem document."""
    return HTTPError(status, message=title, detail=detail, headers=headers)


def problem_response(error: HTTPError) -> Response:
    """The app's error processor: every HTTPError, werkzeug error and validation error ends here."""
    body: dict[str, Any] = {"type": "about:blank", "title": error.message or "Error", "status": error.status_code}
    if isinstance(error.detail, str) and error.detail:
        body["detail"] = error.detail
    elif error.detail:  # webargs' field errors: {location: {field: [messages]}}
        body["detail"] = _field_errors_line(error.detail)
        body["errors"] = error.detail
    else:
        body["detail"] = body["title"]
    response = Response(json.dumps(body), status=error.status_code, mimetype=PROBLEM_TYPE)
    for name, value in Headers(error.headers).items():  # a dict, pairs or Headers, as HTTPError takes them
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _field_errors_line(detail: Any) -> str:
    parts = []
    for location, fields in detail.items() if isinstance(detail, dict) else []:
        for field, messages in fields.items() if isinstance(fields, dict) else [("", fields)]:
            text = "; ".join(map(str, messages)) if isinstance(messages, list) else str(messages)
            parts.append(f"{location} field {field!r}: {text}" if field else f"{location}: {text}")
    return ", ".join(parts) or "invalid request"


def problem_content_types(spec: dict[str, Any]) -> dict[str, Any]:
    """APIFlask documents error bodies as application/json; ours are problem documents."""
    for path in spec.get("paths", {}).values():
        for operation in path.values():
            for code, response in (operation.get("responses") or {}).items():
                content = response.get("content") if isinstance(response, dict) else None
                if str(code)[0] in "45" and content and "application/json" in content:
                    content[PROBLEM_TYPE] = content.pop("application/json")
    return spec
