"""The collector's writes: runs, results and batches, each batch of results in one ``writing`` transaction.

``apply_rows`` is the exactly-once point: results are upserted on (run_id, row_key) and the run's totals move by
the difference each upsert really made, inside one transaction, so a batch delivered twice, or read by two
collectors at once, counts once. Only the collector calls these.

Money is integer nano-dollars (``cost_nano``), the unit the budget keeps in Redis: SQL sums are exact.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import chain
from operator import add, itemgetter
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    String,
    Table,
    bindparam,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.expression import case

from pipeline.collect.store import (
    COMPLETED,
    FINAL_STATUSES,
    RESULT_COLUMNS,
    RUNNING,
    UNREGISTERED,
    batches,
    counted_answers,
    results,
    runs,
)
from pipeline.records import FAILED, RETRYING, SUCCEEDED, Result, RunConfig

# Run totals that move with each result, each the sum over a run's results of one contribution a result makes.
_TOTALS = (
    "rows_succeeded",  # 1 for a success
    "rows_failed",  # 1 for a failure
    "rows_cached",  # 1 for an answer from the cache
    "attempts",
    "timeouts",
    "rate_limited",
    "input_tokens",
    "output_tokens",
    "cost_nano",  # of the results with a known cost
    "rows_unpriced",  # 1 for a result billed by a model without a price (cost_nano NULL)
    "latency_ms_sum",
)


def _insert(conn: Connection, table: Table):
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


_DESCRIPTION = (
    "name",
    "dataset",
    "dataset_hash",
    "provider",
    "model",
    "config",
    "rows_total",
    "chunks_total",
    "created_at",
)


def save_run(conn: Connection, config: RunConfig, status: str) -> None:
    """Create the run's row, or describe the row its results or events made first (a repeated submit changes
    nothing)."""
    values = {
        "run_id": config.run_id,
        "name": config.name,
        "dataset": config.dataset,
        "dataset_hash": config.dataset_hash,
        "provider": config.provider,
        "model": config.model,
        "config": config.to_dict(),
        "status": status,
        "rows_total": config.total_rows,
        "chunks_total": config.total_chunks,
        "created_at": config.created_at or time.time(),
    }
    insert = _insert(conn, runs).values(**values)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["run_id"],
            set_={c: insert.excluded[c] for c in _DESCRIPTION},
            where=runs.c.dataset_hash == UNREGISTERED,
        )
    )


def hold_runs(conn: Connection, run_ids: Iterable[str]) -> None:
    """Make sure each run has its row, and lock the rows (in one order, so that collectors cannot deadlock):
    whatever counts into a run waits for whoever is counting into it, and nothing counts into a row that is
    not there (PostgreSQL would update nothing and lose the count). The usual case, rows that are there, is one
    statement."""
    ordered = sorted(set(run_ids))
    if not ordered:
        return
    held = set(conn.execute(_HOLD, {"runs": ordered}).scalars())
    missing = [run_id for run_id in ordered if run_id not in held]
    if not missing:
        return
    placeholders = [
        {
            "run_id": run_id,
            "dataset": "",
            "dataset_hash": UNREGISTERED,
            "provider": "",
            "model": "",
            "config": {},
            "status": "submitted",
            "created_at": time.time(),
        }
        for run_id in missing
    ]
    conn.execute(_insert(conn, runs).on_conflict_do_nothing(index_elements=["run_id"]), placeholders)
    conn.execute(_HOLD, {"runs": missing})  # another writer's row, made meanwhile: wait for it


_HOLD = (
    select(runs.c.run_id)
    .where(runs.c.run_id.in_(bindparam("runs", expanding=True)))
    .order_by(runs.c.run_id)
    .with_for_update()
)


def set_run_status(conn: Connection, run_id: str, status: str, *, config: RunConfig | None = None) -> None:
    hold_runs(conn, [run_id])
    values: dict[str, Any] = {"status": status}
    if status in FINAL_STATUSES:
        values["finished_at"] = time.time()
    else:
        values["finished_at"] = None
    if config is not None:
        values["config"] = config.to_dict()
    conn.execute(update(runs).where(runs.c.run_id == run_id).values(**values))


@dataclass
class Applied:
    """What a batch changed: the results newly final (for metrics) and the runs touched."""

    changed: list[dict[str, Any]] = field(default_factory=list)
    previous: list[dict[str, Any] | None] = field(default_factory=list)
    runs: set[str] = field(default_factory=set)
    # Rows whose kept result did not change but that now count another paid answer: (row after, row before).
    extra: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def record(self, new: dict[str, Any], old: dict[str, Any] | None) -> None:
        self.changed.append(new)
        self.previous.append(old)
        self.runs.add(new["run_id"])

    def record_new(self, rows: list[dict[str, Any]]) -> None:
        """Rows inserted where there was none."""
        self.changed += rows
        self.previous += [None] * len(rows)
        self.runs.update(map(_run_id, rows))

    def add(self, other: Applied) -> None:
        self.changed += other.changed
        self.previous += other.previous
        self.runs |= other.runs
        self.extra += other.extra


def apply_results(conn: Connection, batch: Sequence[Result]) -> Applied:
    """Upsert a batch of results and move run totals by exactly what the writes changed.

    A success is never replaced (a late duplicate cannot undo it); a failure is replaced by a newer outcome
    (``retry-failed``). Within the batch, the last outcome for a row wins the same way. A row only counts if its
    INSERT or UPDATE really happened; one that another writer got to first is looked at again.
    """
    return apply_rows(conn, list(map(_row_of, batch)))


def apply_rows(conn: Connection, rows: list[dict[str, Any]]) -> Applied:
    """``apply_results`` for results given as their rows: each a dict of a Result's fields (the table's columns),
    checked as ``records.result_fields`` checks them, and this batch's own (it may be changed: values no database
    takes are replaced in it). The collector writes the rows it reads without making Results."""
    ledger = _Ledger()
    incoming = _latest_per_row(rows, ledger)
    hold_runs(conn, set(map(itemgetter(0), incoming)))
    applied = Applied()
    for _ in range(_ROUNDS):
        if not incoming:
            break
        incoming = _apply(conn, incoming, applied, ledger)
    if incoming:
        raise RuntimeError(f"{len(incoming)} results changed under this writer {_ROUNDS} times running")
    _count_other_answers(conn, ledger, applied)
    _move_totals(conn, applied)
    return applied


@dataclass
class _Ledger:
    """Answers of a batch other than the ones rows keep: ``superseded`` ones (their spend is merged into the row
    that replaced them) and ``others`` (paid answers to rows that keep another result: counted once each)."""

    superseded: dict[str, str] = field(default_factory=dict)  # result_id -> run_id
    others: list[dict[str, Any]] = field(default_factory=list)

    def replaced(self, old: dict[str, Any]) -> None:
        if old.get("result_id"):
            self.superseded[old["result_id"]] = old["run_id"]

    def kept_another(self, row: dict[str, Any], kept: dict[str, Any]) -> None:
        if row["result_id"] and row["result_id"] != kept.get("result_id") and _spent(row):
            self.others.append(row)


def _spent(row: dict[str, Any]) -> bool:
    return bool(row["attempts"] or row["cost_nano"] or row["input_tokens"] or row["output_tokens"])


def _count_other_answers(conn: Connection, ledger: _Ledger, applied: Applied) -> None:
    """Record superseded answers, and add each paid answer a row does not keep to that row and its run, once:
    a resumed or duplicated chunk's second paid success is spend too (SQL then equals the budget in Redis)."""
    known = [{"result_id": rid, "run_id": run_id} for rid, run_id in ledger.superseded.items()]
    if known:
        conn.execute(_insert(conn, counted_answers).on_conflict_do_nothing(index_elements=["result_id"]), known)
    for row in ledger.others:
        current = _existing(conn, [row]).get((row["run_id"], row["row_key"]))
        if current is None or not current["result_id"] or current["result_id"] == row["result_id"]:
            continue  # a row from before answer ids, or a redelivery of the answer it keeps
        insert = (
            _insert(conn, counted_answers)
            .values(result_id=row["result_id"], run_id=row["run_id"])
            .on_conflict_do_nothing(index_elements=["result_id"])
            .returning(counted_answers.c.result_id)
        )
        if conn.execute(insert).first() is None:
            continue  # counted before: a redelivered entry
        merged = {**_with_spending_of(current, row), **{c: current[c] for c in _KEPT}}
        conn.execute(
            update(results)
            .where(results.c.id == current["id"])
            .values(**{c: merged[c] for c in (*_SPENDING, "cost_nano", "calls")})
        )
        applied.extra.append((merged, current))
        applied.runs.add(row["run_id"])


# What a row keeps of its own result when another answer's spend is added to it.
_KEPT = (
    "status",
    "answer",
    "parsed",
    "error",
    "provider",
    "model",
    "prompt_hash",
    "input",
    "latency_ms",
    "cached",
    "finished_at",
    "generation",
    "result_id",
    "row_index",
)


_ROUNDS = 3


def _apply(
    conn: Connection, incoming: dict[tuple[str, str], dict[str, Any]], applied: Applied, ledger: _Ledger
) -> dict[tuple[str, str], dict[str, Any]]:
    """One round: insert every row that has none yet (one INSERT ... ON CONFLICT DO NOTHING RETURNING, whose
    conflicts go by the unique index), then look up the others by that same key and replace those the new
    outcome beats. Returns the rows whose write did not take (changed since they were read)."""
    rows = list(incoming.values())
    inserted = _insert_new(conn, rows)
    if len(inserted) == len(rows):  # every row was new (the keys are unique): the usual batch
        applied.record_new(rows)
        return {}
    taken = [key for key in incoming if key not in inserted]
    applied.record_new([row for key, row in incoming.items() if key in inserted])
    existing = _existing(conn, [incoming[key] for key in taken])
    missed = {}
    for key in taken:
        row, old = incoming[key], existing.get(key)
        if old is None:  # gone since the INSERT saw it: try again
            missed[key] = row
        elif not _replaces(row, old):
            ledger.kept_another(row, old)
            continue
        elif _update_unchanged(conn, merged := _with_spending_of(old, row), old):
            applied.record(merged, old)
            ledger.replaced(old)
        else:
            missed[key] = row
    return missed


# Columns whose content comes from datasets or providers: anything may be in them.
_FREE_FORM = ("input", "answer", "parsed", "error")


# Rows per INSERT statement: 21 parameters a row stays under SQLite's 32,766 and PostgreSQL's 65,535.
_INSERT_ROWS = 1000
_JSON_COLUMNS = tuple(c.name for c in results.columns if isinstance(c.type, JSON))
_PLAIN_COLUMNS = tuple(c for c in RESULT_COLUMNS if c not in _JSON_COLUMNS)
_plain_values = itemgetter(*_PLAIN_COLUMNS)
_PLAIN_GETTERS = [itemgetter(c) for c in _PLAIN_COLUMNS]


def _insert_new(conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """Insert the rows that have no result yet; return the keys really inserted."""
    if conn.dialect.name == "postgresql":
        return {(run_id, row_key) for run_id, row_key in _upsert(conn, rows, _INSERT_NEW)}
    return _insert_new_sqlite(conn, rows)


def _insert_new_sqlite(conn: Connection, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """SQLite: the INSERT without RETURNING (it cost a third of the statement), counted by its row count: when
    every row went in, the keys are the rows'. Otherwise the rows it inserted are the table's last ``count``:
    this transaction holds the write lock and SQLite gives a new row the largest rowid plus one."""
    inserted: set[tuple[str, str]] = set()
    quote = conn.dialect.identifier_preparer.quote
    for start in range(0, len(rows), _INSERT_ROWS):
        part = rows[start : start + _INSERT_ROWS]
        result = conn.exec_driver_sql(_values_insert(len(part), quote, _SKIP_STORED), _row_values(part))
        count = result.rowcount
        result.close()
        if count == len(part):
            inserted.update(zip(map(_run_id, part), map(_row_key, part)))
        elif count > 0:
            inserted.update((run_id, row_key) for run_id, row_key in conn.exec_driver_sql(_LAST_INSERTED, (count,)))
    return inserted


def _upsert(conn: Connection, rows: list[dict[str, Any]], conflict: str) -> Iterator[tuple[Any, ...]]:
    """INSERT the rows ... ``conflict`` (its ON CONFLICT and RETURNING clauses), in statements of up to
    _INSERT_ROWS rows; yields what it returns. Parameters go to the driver as they are, JSON columns serialized
    here as SQLAlchemy's JSON type does (``json.dumps``, None as ``null``): SQLAlchemy's per-row parameter
    processing cost more than the database's own work. The conflict target is the unique (run_id, row_key)
    index itself, so no query plan can go by another index."""
    postgres = conn.dialect.name == "postgresql"
    for start in range(0, len(rows), _INSERT_ROWS):
        part = rows[start : start + _INSERT_ROWS]
        if postgres:
            result = conn.exec_driver_sql(_json_insert(conn.dialect, conflict), _column_arrays(part))
        else:
            result = conn.exec_driver_sql(
                _values_insert(len(part), conn.dialect.identifier_preparer.quote, conflict), _row_values(part)
            )
        returned = result.cursor.fetchall()  # the driver's tuples: SQLAlchemy's rows cost as much again
        result.close()
        yield from returned


def _strict_encoder() -> Callable[[Any], str]:
    """``json.JSONEncoder(allow_nan=False).encode``: ``json.dumps`` text, NaN or infinity refused (ValueError).
    Made of json's own C encoder, made once: ``encode`` makes one a call, which cost three times the encoding
    of a result's input. Without a check for circular values: these come from JSON."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # an interpreter without json's C module
        return json.JSONEncoder(allow_nan=False).encode
    default = json.JSONEncoder().default
    encoder = make(None, default, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, False)
    join = "".join

    def encode(value: Any) -> str:
        return join(encoder(value, 0))

    return encode


# NaN or infinity raises ValueError here: the batch's free-form values are then made storable first.
_encode_strict = _strict_encoder()


def _row_values(rows: list[dict[str, Any]]) -> tuple[Any, ...]:
    """SQLite: the rows' values, a row after the other (plain columns, then JSON columns as text)."""
    texts = _json_texts(rows, _texts_per_row)  # first: it may make free-form values storable
    return tuple(chain.from_iterable(map(add, map(_plain_values, rows), zip(*texts))))


def _column_arrays(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """PostgreSQL: each column's values as one JSON array, taken apart in order by the server: one C-level
    serialization a column and batch, where the driver's arrays cost a Python call a value."""
    texts = _json_texts(rows, _array_texts)  # first: it may make free-form values storable
    return (*_plain_arrays(rows), *texts)


def _plain_arrays(rows: list[dict[str, Any]]) -> list[str]:
    columns = [list(map(get, rows)) for get in _PLAIN_GETTERS]
    try:
        return list(map(_encode_strict, columns))
    except ValueError:  # NaN or infinity in a number column: written as PostgreSQL spells them, as text
        return [json.dumps([_named_if_not_finite(v) for v in values]) for values in columns]


def _named_if_not_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value


def _texts_per_row(rows: list[dict[str, Any]], encode: Callable[[Any], str]) -> list[list[str]]:
    return [
        _encoded_repeats(map(itemgetter(c), rows), encode)
        if c in _REPEATING
        else [encode(v) if v is not None else "null" for v in map(itemgetter(c), rows)]
        for c in _JSON_COLUMNS
    ]


# JSON columns whose values repeat from row to row (the same calls; the same parsed label): each flat object
# is encoded once a batch.
_REPEATING = ("calls", "parsed")


def _encoded_repeats(values: Iterable[Any], encode: Callable[[Any], str]) -> list[str]:
    """Each value's JSON text; a flat object equal to one before it (same keys, values and value types: 1 is not
    true) takes that one's text."""
    texts: list[str] = []
    known: dict[Any, str] = {}
    for value in values:
        if value is None:
            texts.append("null")
            continue
        try:
            key = (tuple(value.items()), tuple(map(type, value.values())))
            text = known.get(key)
            if text is None:
                text = known[key] = encode(value)
        except (AttributeError, TypeError):  # not an object, or not a flat one
            text = encode(value)
        texts.append(text)
    return texts


def _array_texts(rows: list[dict[str, Any]], encode: Callable[[Any], str]) -> list[str]:
    return [encode([row[c] for row in rows]) for c in _JSON_COLUMNS]


def _json_texts(rows: list[dict[str, Any]], make: Callable[..., Any]) -> Any:
    """The JSON columns' texts made by ``make``, from rows that every database takes: when the rows hold a NUL
    character or a non-finite number in a free-form column, those columns are made ``storable`` first, in
    place (so that a later UPDATE of the row writes the same). Checked on the batch's texts at once: nothing is
    walked value by value unless something is to be replaced."""
    try:
        texts = make(rows, _encode_strict)
        if not _holds_nul(rows, texts):
            return texts
    except ValueError:
        pass
    for row in rows:
        for column in _FREE_FORM:
            row[column] = storable(row[column])
    return make(rows, json.dumps)  # what remains non-finite is in no free-form column: stored as it was before


_FREE_JSON = tuple(i for i, c in enumerate(_JSON_COLUMNS) if c in _FREE_FORM)
_FREE_TEXT = tuple(c for c in _FREE_FORM if c not in _JSON_COLUMNS)


def _holds_nul(rows: list[dict[str, Any]], texts: list[Any]) -> bool:
    """Whether a free-form value may hold a NUL character: escaped in JSON text (a literal backslash followed
    by ``u0000`` counts too, harmlessly: storable then finds nothing), raw in text columns."""
    if any("\\u0000" in (texts[i] if isinstance(texts[i], str) else "".join(texts[i])) for i in _FREE_JSON):
        return True
    try:
        return any("\x00" in "".join([row[c] or "" for row in rows]) for c in _FREE_TEXT)
    except TypeError:  # not text: storable decides
        return True


def _cast_type(column_type: Any, dialect: Any) -> str:
    """TEXT for text columns: a cast to VARCHAR(n) would cut an over-long value silently, where the INSERT
    refuses it (and the collector stores the row as failed, saying so)."""
    return "TEXT" if isinstance(column_type, String) else column_type.compile(dialect=dialect)


_SKIP_STORED = "ON CONFLICT (run_id, row_key) DO NOTHING"
_INSERT_NEW = _SKIP_STORED + " RETURNING run_id, row_key"
_LAST_INSERTED = "SELECT run_id, row_key FROM results WHERE id > (SELECT max(id) FROM results) - ?"
# Locks and returns the stored row: an update that changes nothing (see _existing).
_STORED_COLUMNS = ("id", *RESULT_COLUMNS)
_READ_STORED = "ON CONFLICT (run_id, row_key) DO UPDATE SET row_index = results.row_index RETURNING " + ", ".join(
    _STORED_COLUMNS
)


@lru_cache(maxsize=16)
def _values_insert(count: int, quote: Callable[[str], str], conflict: str) -> str:
    """SQLite: an INSERT of ``count`` rows that skips (run_id, row_key) already there and returns the keys it
    inserted."""
    one = "(" + ", ".join(["?"] * len(RESULT_COLUMNS)) + ")"
    columns = ", ".join(quote(c) for c in _PLAIN_COLUMNS + _JSON_COLUMNS)
    return f"INSERT INTO {quote(results.name)} ({columns}) VALUES {', '.join([one] * count)} {conflict}"


@lru_cache(maxsize=8)
def _json_insert(dialect: Any, conflict: str) -> str:
    """PostgreSQL: the same INSERT with one JSON array parameter a column, a statement of fixed text that the
    server parses and plans once per connection, whatever the batch size. ``ROWS FROM`` zips the arrays'
    elements by position; a plain column's come as text, cast to the column's type, a JSON column's as JSON
    (their text kept as written). The server spends about 2 us a row more than on binary arrays, which cost
    the driver a Python call a value (about 4 us a row more)."""
    quote = dialect.identifier_preparer.quote
    names = [quote(c) for c in _PLAIN_COLUMNS + _JSON_COLUMNS]
    picked = [f"CAST({quote(c)} AS {_cast_type(results.c[c].type, dialect)})" for c in _PLAIN_COLUMNS]
    picked += [quote(c) for c in _JSON_COLUMNS]
    elements = ["json_array_elements_text(CAST(%s AS JSON))"] * len(_PLAIN_COLUMNS)
    elements += ["json_array_elements(CAST(%s AS JSON))"] * len(_JSON_COLUMNS)
    return (
        f"INSERT INTO {quote(results.name)} ({', '.join(names)}) SELECT {', '.join(picked)} "
        f"FROM ROWS FROM ({', '.join(elements)}) AS given({', '.join(names)}) {conflict}"
    )


def _update_unchanged(conn: Connection, row: dict[str, Any], old: dict[str, Any]) -> bool:
    """Replace ``old`` with ``row`` if it is still what was read."""
    c = results.c
    return (
        conn.execute(
            update(results)
            .where(c.id == old["id"], c.status == old["status"], c.finished_at == old["finished_at"])
            .values(**row)
        ).rowcount
        == 1
    )


def reopen_failed(
    conn: Connection, run_id: str, row_keys: Sequence[str], before: float, generation: int | None = None
) -> int:
    """Failed rows that retry-failed sent again (as retry ``generation``) count as pending until their new
    result comes. A result of that generation is that new result: a redelivered event must not reopen it. (An
    event from an older version has only its CLI host's time, ``before``.)"""
    c = results.c
    newer = c.finished_at < before if generation is None else c.generation < generation
    reopened = conn.execute(
        update(results)
        .where(c.run_id == run_id, c.row_key.in_(row_keys), c.status == FAILED, newer)
        .values(status=RETRYING)
    ).rowcount
    if reopened:
        conn.execute(update(runs).where(runs.c.run_id == run_id).values(rows_failed=runs.c.rows_failed - reopened))
    return reopened


def _replaces(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """A success is final; otherwise a success wins, then the later retry generation (a number every host
    shares, where clocks are not), then, within one generation (a chunk's own retries), the later finish."""
    if old["status"] == SUCCEEDED:
        return False
    if new["status"] == SUCCEEDED:
        return True
    if new["generation"] != old["generation"]:
        return new["generation"] > old["generation"]
    return new["finished_at"] > old["finished_at"]


def _latest_per_row(rows: list[dict[str, Any]], ledger: _Ledger) -> dict[tuple[str, str], dict[str, Any]]:
    """Each row's result to write: the one that wins among the batch's results for that row."""
    latest = dict(zip(zip(map(_run_id, rows), map(_row_key, rows)), rows))
    if len(latest) == len(rows):  # the usual batch: one result a row
        return latest
    latest = {}
    for row in rows:
        key = (row["run_id"], row["row_key"])
        kept = latest.get(key)
        if kept is None:
            latest[key] = row
        elif _replaces(row, kept):
            latest[key] = _with_spending_of(kept, row)
            ledger.replaced(kept)
        else:
            ledger.kept_another(row, kept)
    return latest


_run_id, _row_key = itemgetter("run_id"), itemgetter("row_key")
_FIELDS_ARE_COLUMNS = {f.name for f in fields(Result)} == set(RESULT_COLUMNS)


def _row_of(result: Result) -> dict[str, Any]:
    """A result's row: its fields, copied (they are the table's columns)."""
    if _FIELDS_ARE_COLUMNS:
        return dict(vars(result))
    values = vars(result)
    return {c: values[c] for c in RESULT_COLUMNS}


def storable(value: Any) -> Any:
    """What every database takes: no NUL characters (PostgreSQL text refuses them), no NaN or infinity in JSON."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


# What a row's calls consumed: a newer result for the row (retry-failed) adds to it instead of replacing it.
_SPENDING = ("attempts", "timeouts", "rate_limited", "input_tokens", "output_tokens", "usage_estimated")


def _with_spending_of(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(new)
    for column in _SPENDING:
        merged[column] = old[column] + new[column]
    unknown = old["cost_nano"] is None or new["cost_nano"] is None
    merged["cost_nano"] = None if unknown else old["cost_nano"] + new["cost_nano"]
    calls = dict(old.get("calls") or {})
    for outcome, count in (new.get("calls") or {}).items():
        calls[outcome] = calls.get(outcome, 0) + count
    merged["calls"] = calls
    return merged


def _existing(conn: Connection, rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The stored results of rows that ``_insert_new`` found already there, locked for this transaction.

    Read through the same INSERT ... ON CONFLICT, with an update that changes nothing, so that each row is found
    by the unique (run_id, row_key) index whatever the planner knows: a SELECT by run_id and a list of row keys
    read the run's every row for each batch on a PostgreSQL table without statistics, and so did a join or a
    LATERAL lookup (by the (run_id, status) index), as did SQLite for ``(run_id, row_key) IN (VALUES ...)``.
    Results are never deleted, so each of these rows is still there and none is inserted here."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    decode = conn.dialect.name != "postgresql"  # psycopg decodes JSON columns itself
    for values in _upsert(conn, rows, _READ_STORED):
        row = dict(zip(_STORED_COLUMNS, values))
        if decode:
            for column in _JSON_COLUMNS:
                row[column] = json.loads(row[column]) if row[column] is not None else None
            row["cached"] = bool(row["cached"])
        found[(row["run_id"], row["row_key"])] = row
    return found


def _move_totals(conn: Connection, applied: Applied) -> None:
    """Move each touched run's totals by what its results changed (each new row's contribution less the one of
    the row it replaced): one UPDATE of fixed text for every run of the batch."""
    moves: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    pairs = [*zip(applied.changed, applied.previous), *applied.extra]
    if not pairs:
        return
    first_run = pairs[0][0]["run_id"]
    if not applied.extra and all(old is None for old in applied.previous) and applied.runs == {first_run}:
        moves[first_run] = (applied.changed, [])  # the usual batch: new rows of one run
    else:
        for new, old in pairs:
            news, olds = moves.setdefault(new["run_id"], ([], []))
            news.append(new)
            if old is not None:
                olds.append(old)
    parameters = []
    for run_id, (news, olds) in moves.items():
        added, removed = _sums(news), _sums(olds)
        finished = list(map(_finished_at, news))
        values: dict[str, Any] = {f"add_{c}": added[c] - removed[c] for c in _TOTALS}
        values.update(run=run_id, first=min(finished), last=max(finished))
        parameters.append(values)
    conn.execute(_MOVE_TOTALS, parameters)


_finished_at = itemgetter("finished_at")
_COUNTED = {c: itemgetter(c) for c in ("attempts", "timeouts", "rate_limited", "input_tokens", "output_tokens")}
_status, _cached, _cost, _latency = (itemgetter(c) for c in ("status", "cached", "cost_nano", "latency_ms"))


def _sums(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each total's contribution summed over the rows, a column at a time (no Python call per row and total)."""
    statuses, costs = list(map(_status, rows)), list(map(_cost, rows))
    sums = {column: sum(map(get, rows)) for column, get in _COUNTED.items()}
    sums.update(
        rows_succeeded=statuses.count(SUCCEEDED),
        rows_failed=statuses.count(FAILED),
        rows_cached=sum(map(bool, map(_cached, rows))),
        cost_nano=sum(filter(None, costs)),
        rows_unpriced=costs.count(None),
        latency_ms_sum=sum(map(_latency, rows)),
    )
    return sums


# Fixed text, compiled once (SQLAlchemy's cache): a total that did not move is added 0.
_MOVE_TOTALS = (
    update(runs)
    .where(runs.c.run_id == bindparam("run"))
    .values(
        {
            **{c: runs.c[c] + bindparam(f"add_{c}", type_=runs.c[c].type) for c in _TOTALS},
            "first_result_at": func.coalesce(runs.c.first_result_at, bindparam("first", type_=Float)),
            "last_result_at": bindparam("last", type_=Float),
        }
    )
)


def finish_complete_runs(conn: Connection, run_ids: Iterable[str]) -> list[str]:
    """Mark runs whose every row has a result as completed (a cancel that came too late to stop any row
    included). Returns the ones finished now."""
    asked = sorted(set(run_ids))
    if not asked:
        return []
    finished = []
    for run_id, status, total, succeeded, failed, dataset_hash in conn.execute(_PROGRESS, {"runs": asked}):
        if dataset_hash == UNREGISTERED:  # its size is not known yet
            continue
        complete = succeeded + failed >= total
        if complete and status != COMPLETED:
            set_run_status(conn, run_id, COMPLETED)
            finished.append(run_id)
        elif not complete and status == "submitted":
            set_run_status(conn, run_id, RUNNING)
    return finished


# Fixed text, compiled once: the runs' progress, one query for a batch's runs.
_PROGRESS = (
    select(
        runs.c.run_id, runs.c.status, runs.c.rows_total, runs.c.rows_succeeded, runs.c.rows_failed, runs.c.dataset_hash
    )
    .where(runs.c.run_id.in_(bindparam("runs", expanding=True)))
    .order_by(runs.c.run_id)
)


def save_batch(conn: Connection, event: dict[str, Any]) -> None:
    """Upsert a chunk's batch from a worker's batch event. A later round replaces an earlier one, never the
    reverse (a round's intent is published before the round before it is marked ended); a known batch id is
    kept when an event of the same round does not carry it."""
    now = time.time()
    values = {
        "run_id": event["run_id"],
        "chunk": event["chunk"],
        "round": event["round"],
        "batch_id": event.get("batch_id"),
        "provider": event["provider"],
        "state": event["state"],
        "created_at": event.get("at") or now,
        "updated_at": now,
    }
    insert = _insert(conn, batches).values(**values)
    same_round = batches.c.round == insert.excluded.round
    keep_id = func.coalesce(insert.excluded.batch_id, batches.c.batch_id)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["run_id", "chunk"],
            set_={
                "round": insert.excluded.round,
                "state": insert.excluded.state,
                "updated_at": insert.excluded.updated_at,
                "batch_id": case((same_round, keep_id), else_=insert.excluded.batch_id),
                "created_at": case((same_round, batches.c.created_at), else_=insert.excluded.created_at),
            },
            where=batches.c.round <= insert.excluded.round,
        )
    )
