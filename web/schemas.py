"""Request and response schemas (marshmallow): what the API validates and what its OpenAPI document says."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import Boolean, File, Float, Integer, List, Nested, String
from apiflask.validators import Length, OneOf, Range
from marshmallow import ValidationError

PROVIDERS = ("fake", "openai", "anthropic", "compatible")
EXPORT_FORMATS = ("csv", "jsonl", "parquet")
MODES = ("online", "batch")


def storable_text(value: str) -> None:
    """No text the API takes may hold a NUL or a lone surrogate: PostgreSQL's text columns refuse the first
    (Schemathesis found a 500 there), UTF-8 cannot encode the second."""
    if "\x00" in value:
        raise ValidationError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("must be valid Unicode text (no lone surrogates)") from None


def text(low: int, high: int) -> list:
    return [Length(low, high), storable_text]


class LoginIn(Schema):
    username = String(required=True, validate=text(1, 64))
    password = String(required=True, validate=text(1, 1024))


class TokensOut(Schema):
    access_token = String(required=True)
    refresh_token = String(required=True)
    token_type = String(required=True)
    expires_in = Integer(required=True, metadata={"description": "Seconds the access token lives."})


class RefreshOut(Schema):
    access_token = String(required=True)
    token_type = String(required=True)
    expires_in = Integer(required=True)


class LogoutIn(Schema):
    refresh_token = String(validate=text(1, 4096), metadata={"description": "Revoke this refresh token too."})


class SubmitIn(Schema):
    """The CLI's submit options, as form fields beside the uploaded file."""

    file = File(required=True, metadata={"description": "The dataset: .csv, .jsonl/.ndjson or .parquet/.pq."})
    template = String(required=True, validate=text(1, 100_000), metadata={"description": "Jinja2 template."})
    provider = String(load_default="fake", validate=OneOf(PROVIDERS))
    model = String(validate=text(1, 200))
    system = String(validate=text(0, 100_000))
    temperature = Float(validate=Range(0, 2))
    max_tokens = Integer(load_default=256, validate=Range(1, 1_000_000))
    params = String(validate=text(0, 100_000), metadata={"description": "A JSON object of provider parameters."})
    json_schema = String(validate=text(0, 100_000), metadata={"description": "A JSON schema for the answers."})
    fallback = List(String(validate=text(3, 300)), metadata={"description": "PROVIDER:MODEL, repeatable."})
    id_column = String(validate=text(1, 200))
    chunk_size = Integer(validate=Range(1, 100_000))
    max_cost = Float(validate=Range(0, 1e9))
    price_in = Float(validate=Range(0, 1e9))
    price_out = Float(validate=Range(0, 1e9))
    no_cache = Boolean(load_default=False)
    rpm = Integer(validate=Range(1, 100_000_000))
    tpm = Integer(validate=Range(1, 1_000_000_000))
    name = String(validate=text(1, 200))
    idempotency_key = String(validate=text(1, 200))
    mode = String(
        load_default="online",
        validate=OneOf(MODES),
        metadata={
            "description": "batch: through the provider's batch API (openai, anthropic), at its "
            "batch price, answers within 24 hours."
        },
    )


class SubmitOut(Schema):
    run_id = String(required=True)
    rows = Integer(required=True)
    chunks = Integer(required=True)
    jobs_enqueued = Integer(required=True)
    existing = Boolean(required=True, metadata={"description": "The same run was submitted before."})
    unpriced = List(String(), required=True, metadata={"description": "Models without a price: cost unknown."})


class RunOut(Schema):
    run_id = String(required=True)
    name = String(allow_none=True)
    filename = String(allow_none=True, metadata={"description": "The uploaded file's name."})
    status = String(required=True)
    provider = String(required=True)
    model = String(required=True)
    mode = String(validate=OneOf(MODES), metadata={"description": "online or batch."})
    rows_total = Integer(required=True)
    rows_succeeded = Integer(required=True)
    rows_failed = Integer(required=True)
    rows_pending = Integer(required=True)
    rows_in_handoff = Integer(required=True)
    rows_cached = Integer(required=True)
    attempts = Integer(required=True)
    timeouts = Integer(required=True)
    rate_limited = Integer(required=True)
    input_tokens = Integer(required=True)
    output_tokens = Integer(required=True)
    cost_usd = Float(allow_none=True, metadata={"description": "null: a model without a price answered."})
    rows_unpriced = Integer(required=True)
    max_cost = Float(allow_none=True)
    avg_latency_ms = Float(allow_none=True)
    elapsed_s = Float(required=True)
    eta_s = Float(allow_none=True, metadata={"description": "Seconds left at the rate so far."})
    note = String(allow_none=True)


class RunDetail(RunOut):
    """One run (its own class: APIFlask would register RunOut twice, once nested in RunsPage)."""


class RunsPage(Schema):
    items = List(Nested(RunOut), required=True)
    page = Integer(required=True)
    per_page = Integer(required=True)
    total = Integer(required=True)


class PageQuery(Schema):
    page = Integer(load_default=1, validate=Range(1, 1_000_000))
    per_page = Integer(load_default=20, validate=Range(1, 100))


class ResultsQuery(Schema):
    format = String(load_default="csv", validate=OneOf(EXPORT_FORMATS))
    raw = Boolean(load_default=False, metadata={"description": "CSV without the formula escaping."})


class ResumeIn(Schema):
    max_cost = Float(validate=Range(0, 1e9), allow_none=True, metadata={"description": "A new budget (USD)."})


class ActionOut(Schema):
    run_id = String(required=True)
    jobs = Integer(required=True, metadata={"description": "Jobs cancelled or enqueued."})


class HealthOut(Schema):
    status = String(required=True)
    checks = List(String(), required=False)
