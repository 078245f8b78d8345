"""The small values that travel between stages: rows in, run configuration, results out. All JSON-safe."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.pricing import NANO

SUCCEEDED = "succeeded"
FAILED = "failed"
RETRYING = "retrying"  # a failed row that retry-failed sent again, until its new result comes
STOPPED = "stopped"  # a budget stop or a cancel cut the row short after answers were billed: resume asks again


class _ResultIds:
    """Ids of answers, 32 hex digits as ``uuid4().hex`` and as unique: 80 random bits drawn once per process (again
    in a forked child), then a count. A uuid4 per result cost a system call and an object for every row."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):012x}"


new_result_id = _ResultIds()
os.register_at_fork(after_in_child=new_result_id.reset)


@dataclass(frozen=True)
class Row:
    """One input row: its stable key (from ``--id-column`` or its position) and its column values."""

    key: str
    index: int
    values: dict[str, Any]


@dataclass(frozen=True)
class RowsJSON:
    """A chunk's rows already serialized, as its job carries them: the items of the payload's ``rows`` array
    (``{"key": ..., "index": ..., "values": {...}}``), comma-separated. Serialized once, at the validating pass."""

    count: int
    text: str

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class ModelTarget:
    """Which provider and model answer a row."""

    provider: str
    model: str

    @classmethod
    def parse(cls, text: str) -> ModelTarget:
        provider, _, model = text.partition(":")
        return cls(provider.strip(), model.strip())

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


@dataclass
class RunConfig:
    """Everything that defines a run. Stored in Redis for workers and in the ``runs`` table."""

    run_id: str
    dataset: str
    dataset_hash: str
    template: str
    provider: str
    model: str
    system_prompt: str | None = None
    temperature: float | None = None
    max_tokens: int = 256
    params: dict[str, Any] = field(default_factory=dict)
    json_schema: dict[str, Any] | None = None
    schema_attempts: int = 2
    fallbacks: list[str] = field(default_factory=list)
    id_column: str | None = None
    chunk_size: int = 100
    total_rows: int = 0
    total_chunks: int = 0
    max_cost: float | None = None
    price_in: float | None = None  # USD per million tokens of ``model`` for this run (--price-in/--price-out)
    price_out: float | None = None
    use_cache: bool = True
    rpm: int | None = None
    tpm: int | None = None
    name: str | None = None
    idempotency_key: str | None = None
    created_at: float = 0.0
    owner: str | None = None  # the web user who submitted it; None: the CLI, a runs file or the scheduler
    mode: str = "online"  # "batch": the provider's batch API, at its batch price (pipeline.calls.batches)

    @property
    def targets(self) -> list[ModelTarget]:
        return [ModelTarget(self.provider, self.model)] + [ModelTarget.parse(f) for f in self.fallbacks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Result:
    """The outcome of one row: exactly one per input row ends in the ``results`` table."""

    run_id: str
    row_key: str
    row_index: int
    status: str
    input: dict[str, Any]
    prompt_hash: str = ""
    answer: str | None = None
    parsed: Any = None
    error: str | None = None
    provider: str | None = None
    model: str | None = None
    attempts: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int | None = 0  # nano-dollars billed; None when a call was billed by a model without a price
    latency_ms: float = 0.0
    cached: bool = False
    finished_at: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)  # "provider|model|outcome" -> provider calls made
    usage_estimated: int = 0  # answers billed without usage from the provider: counted at their reserved worst case
    # The retry generation of the chunk that answered (0: submit; resume and retry-failed count up in Redis): it,
    # not a host's clock, orders two outcomes of one row.
    generation: int = 0
    result_id: str = field(default_factory=new_result_id)  # one per answer: a redelivery keeps it
    batch_id: str | None = None  # the provider batch that answered the row (batch mode)

    @classmethod
    def failure(cls, run_id: str, row: Row, error: str | None = None) -> Result:
        """A failed result for ``row``: the start of every row's result, and the whole of one that cannot run."""
        return cls(
            run_id=run_id,
            row_key=row.key,
            row_index=row.index,
            status=FAILED,
            input=row.values,
            error=error,
            finished_at=time.time(),
        )

    def to_json(self) -> str:
        return self.encoded().decode()

    def encoded(self) -> bytes:
        """The result as UTF-8 JSON, by orjson (a fifth of the json module's CPU, a share of every row's). What
        orjson refuses (text that is not valid Unicode, an integer past 64 bits) is written by the json module,
        ASCII-escaped, so that it reads back the same; NaN, which only a parsed answer can hold and SQL stores as
        null, is written null."""
        fields = vars(self)  # asdict deep-copies every nested value
        try:
            return orjson.dumps(fields, default=str)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return json.dumps(fields, default=str).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """A result as any worker version sent it: fields this version does not know are ignored (a newer
        worker in a rolling deploy), an older worker's dollar ``cost`` becomes nano-dollars. Raises ValueError
        for data that is not a result."""
        # Built without __init__ (a quarter of the collector's decoding time).
        result = object.__new__(cls)
        result.__dict__.update(result_fields(data))
        return result


def result_fields(data: dict[str, Any]) -> dict[str, Any]:
    """What ``Result.from_dict`` reads from ``data``, as a dict of the Result's fields, checked (ValueError):
    the collector writes these without making a Result. The usual case, a worker of this version, sends every
    field: ``data`` itself is returned."""
    fields = data if data.keys() == _RESULT_FIELDS else _completed(data)
    _check(fields)
    return fields


def _check(v: dict[str, Any]) -> None:
    """Refuse fields of the wrong type. Runs once per result the collector reads: the usual result passes the
    exact-type tests below (plain tests, no generators), anything else is judged by ``_check_fully``."""
    usual = (
        type(v["run_id"]) is str
        and type(v["row_key"]) is str
        and v["status"] in _STATUSES
        and type(v["result_id"]) is str
        and {
            type(v["row_index"]),
            type(v["attempts"]),
            type(v["timeouts"]),
            type(v["rate_limited"]),
            type(v["input_tokens"]),
            type(v["output_tokens"]),
            type(v["usage_estimated"]),
            type(v["generation"]),
        }
        == _INT_ONLY
        and (v["cost_nano"] is None or type(v["cost_nano"]) is int)
        and type(v["input"]) is dict
        and type(v["finished_at"]) in _NUMBERS
        and (v["batch_id"] is None or type(v["batch_id"]) is str)
        and {type(v["prompt_hash"]), type(v["answer"]), type(v["error"]), type(v["provider"]), type(v["model"])}
        <= _TEXT_OR_NULL
        and type(v["latency_ms"]) in _NUMBERS
        and type(v["calls"]) is dict
    )
    if not usual:
        _check_fully(v)


def _check_fully(v: dict[str, Any]) -> None:
    run_id, row_key, status = v["run_id"], v["row_key"], v["status"]
    texts_ok = isinstance(run_id, str) and isinstance(row_key, str) and isinstance(status, str)
    if not texts_ok or status not in (SUCCEEDED, FAILED, STOPPED):
        raise ValueError(f"run_id, row_key and status must be text, status {SUCCEEDED}, {FAILED} or {STOPPED}")
    if not isinstance(v["result_id"], str):
        raise ValueError("result_id must be text")
    counts = {
        type(v[name])
        for name in (
            "row_index",
            "attempts",
            "timeouts",
            "rate_limited",
            "input_tokens",
            "output_tokens",
            "usage_estimated",
            "generation",
        )
    }
    if counts != _INT_ONLY and not all(issubclass(t, int) and t is not bool for t in counts):
        raise ValueError("row_index, attempts and token counts must be integers")
    cost = v["cost_nano"]
    if cost is not None and type(cost) is not int and (not isinstance(cost, int) or isinstance(cost, bool)):
        raise ValueError("cost_nano must be an integer or null")
    if not isinstance(v["input"], dict) or not isinstance(v["finished_at"], (int, float)):
        raise ValueError("input must be an object and finished_at a number")
    if v["batch_id"] is not None and not isinstance(v["batch_id"], str):
        raise ValueError("batch_id must be text or null")
    # A value SQLite cannot bind fails the whole batch as if the database were down: refused here, it is parked.
    texts = (v["prompt_hash"], v["answer"], v["error"], v["provider"], v["model"])
    if not all(t is None or isinstance(t, str) for t in texts):
        raise ValueError("prompt_hash, answer, error, provider and model must be text or null")
    if not isinstance(v["latency_ms"], (int, float)) or not isinstance(v["calls"], dict):
        raise ValueError("latency_ms must be a number and calls an object")


def _completed(data: dict[str, Any]) -> dict[str, Any]:
    """A result's fields from a worker of another version: its unknown fields left out, the missing ones at
    their defaults."""
    values = {k: v for k, v in data.items() if k in _RESULT_FIELDS}
    values.setdefault("result_id", "")  # an older worker's result: no id, so never counted as a second answer
    if "cost_nano" not in data and isinstance(data.get("cost"), (int, float)):
        values["cost_nano"] = round(data["cost"] * NANO)
    missing = _RESULT_REQUIRED - values.keys()
    if missing:
        raise ValueError(f"result without {', '.join(sorted(missing))}")
    # The defaults, computed once; a default factory runs only for a field the data leaves out.
    complete = dict(_RESULT_DEFAULTS)
    for name, factory in _RESULT_FACTORIES.items():
        if name not in values:
            complete[name] = factory()
    complete.update(values)
    return complete


_INT_ONLY = {int}
_TEXT_OR_NULL = {str, type(None)}
_NUMBERS = (float, int)
_STATUSES = (SUCCEEDED, FAILED, STOPPED)
# Read once: dataclasses.fields() costs per call.
_RESULT_FIELDS = frozenset(f.name for f in dataclasses.fields(Result))
_RESULT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Result) if f.default is not dataclasses.MISSING}
_RESULT_FACTORIES = {
    f.name: f.default_factory for f in dataclasses.fields(Result) if f.default_factory is not dataclasses.MISSING
}
_RESULT_REQUIRED = _RESULT_FIELDS - _RESULT_DEFAULTS.keys() - _RESULT_FACTORIES.keys()


def stable_hash(*parts: Any) -> str:
    """A SHA-256 hex digest over JSON-encoded parts: the same inputs always give the same key."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
