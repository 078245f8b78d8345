"""SQL tables (SQLAlchemy Core) and the queries the rest of the pipeline needs.

Only the collector writes here, each batch in one ``writing`` transaction. ``apply_results`` is the exactly-once
point: results are upserted on (run_id, row_key) and the run's totals move by the difference each upsert really
made, inside one transaction, so a batch delivered twice, or read by two collectors at once, counts once.

Money is integer nano-dollars (``cost_nano``), the unit the budget keeps in Redis: SQL sums are exact.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import chain, islice
from operator import add, itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.expression import case

from .errors import ConfigError
from .records import FAILED, RETRYING, SUCCEEDED, Result, RunConfig

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("name", String(200)),
    Column("dataset", Text, nullable=False),
    Column("dataset_hash", String(64), nullable=False),
    Column("provider", String(64), nullable=False),
    Column("model", String(200), nullable=False),
    Column("config", JSON, nullable=False),
    Column("status", String(32), nullable=False),
    Column("rows_total", Integer, nullable=False, default=0),
    Column("chunks_total", Integer, nullable=False, default=0),
    Column("rows_succeeded", Integer, nullable=False, default=0),
    Column("rows_failed", Integer, nullable=False, default=0),
    Column("rows_cached", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("timeouts", Integer, nullable=False, default=0),
    Column("rate_limited", Integer, nullable=False, default=0),
    Column("input_tokens", Integer, nullable=False, default=0),
    Column("output_tokens", Integer, nullable=False, default=0),
    Column("cost_nano", BigInteger, nullable=False, default=0),  # of the results with a known cost
    Column("rows_unpriced", Integer, nullable=False, default=0),  # results billed by a model without a price
    Column("latency_ms_sum", Float, nullable=False, default=0.0),
    Column("created_at", Float, nullable=False),
    Column("first_result_at", Float),
    Column("last_result_at", Float),
    Column("finished_at", Float),
)

results = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("row_key", String(512), nullable=False),
    Column("row_index", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("prompt_hash", String(64), nullable=False, default=""),
    Column("answer", Text),
    Column("parsed", JSON),
    Column("error", Text),
    Column("provider", String(64)),
    Column("model", String(200)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("timeouts", Integer, nullable=False, default=0),
    Column("rate_limited", Integer, nullable=False, default=0),
    Column("input_tokens", Integer, nullable=False, default=0),
    Column("output_tokens", Integer, nullable=False, default=0),
    Column("cost_nano", BigInteger),  # nano-dollars; NULL: billed by a model without a price, cost unknown
    Column("latency_ms", Float, nullable=False, default=0.0),
    Column("cached", Boolean, nullable=False, default=False),
    Column("calls", JSON),  # provider calls by "provider|model|outcome", for audit and metrics
    Column("finished_at", Float, nullable=False),
    Column("usage_estimated", Integer, nullable=False, default=0),  # answers billed at their reserved worst case
    Column("generation", Integer, nullable=False, default=0),  # orders a row's outcomes (never host clocks)
    Column("result_id", String(32)),  # the worker's id of the answer kept here
    Column("batch_id", String(128)),  # the provider batch that answered the row (batch mode); NULL online
    UniqueConstraint("run_id", "row_key", name="uq_results_run_row"),
    Index("ix_results_run_status", "run_id", "status"),  # retry-failed, counts by status
    Index("ix_results_run_index", "run_id", "row_index"),  # export and resume, in input order
)

# Answers whose spend a row counts besides the one it keeps (a failure it replaced, a second paid success of a
# duplicated chunk): a redelivered entry of one of them is recognised here and not counted twice.
counted_answers = Table(
    "counted_answers",
    metadata,
    Column("result_id", String(32), primary_key=True),
    Column("run_id", String(64), nullable=False),
)

# Batch mode's record of each chunk's provider batch (written by the collector from the workers' batch events),
# so that a chunk run again after Redis lost its state adopts the batch instead of paying for a second one.
batches = Table(
    "batches",
    metadata,
    Column("run_id", String(64), nullable=False),
    Column("chunk", String(64), nullable=False),
    Column("round", Integer, nullable=False, default=1),
    Column("batch_id", String(128)),  # NULL while only the intent is known
    Column("provider", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("run_id", "chunk", name="uq_batches_run_chunk"),
)

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
RESULT_COLUMNS = [c.name for c in results.columns if c.name != "id"]
# Columns an older version's tables lack, with what they hold (the README's 'Upgrading a database' adds them).
_NEWER_COLUMNS = {
    "runs": {"cost_nano": "money as a float"},
    "results": {
        "cost_nano": "money as a float",
        "usage_estimated": "no estimated-usage count",
        "generation": "no retry generation",
        "result_id": "no answer id",
        "batch_id": "no batch id",
    },
}


def make_engine(url: str) -> Engine:
    """An engine with the schema created on first use. SQLite gets WAL so readers never block the collector."""
    engine = open_engine(url)
    prepare(engine)
    return engine


def open_engine(url: str) -> Engine:
    """An engine that has not talked to the database yet: the collector starts with it while the database is
    down, and calls ``prepare`` once it answers."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        if engine.url.database not in (None, "", ":memory:"):
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def prepare(engine: Engine) -> None:
    """Create missing tables; refuse tables from an older version (ConfigError). Raises DBAPIError when the
    database does not answer."""
    metadata.create_all(engine)
    _refuse_old_schema(engine)
    _add_missing_indexes(engine)


def _add_missing_indexes(engine: Engine) -> None:
    """Indexes a newer version added to a table an older one made (create_all makes indexes only with their
    table). Asked first, so that a start does not lock the table when nothing is missing; creating one locks
    writes to ``results`` for as long as it takes (about a second per million rows)."""
    present = {index["name"] for index in inspect(engine).get_indexes(results.name)}
    for index in results.indexes:
        if index.name not in present:
            with engine.begin() as conn:
                conn.execute(CreateIndex(index, if_not_exists=True))


def _refuse_old_schema(engine: Engine) -> None:
    """Tables made by an older version (money as a float ``cost``, no batch id ...): create_all leaves them as
    they are."""
    tables = inspect(engine)
    for table, newer in _NEWER_COLUMNS.items():
        have = {c["name"] for c in tables.get_columns(table)}
        missing = [why for column, why in newer.items() if column not in have]
        if missing:
            raise ConfigError(
                f"the database's {table} table is from an older version ({missing[0]}); "
                "upgrade it as the README's 'Upgrading a database' says"
            )


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction. On SQLite it begins IMMEDIATE, taking the write lock before the first read, so that
    what a collector reads to decide a write is still true when it writes (SQLite has no SELECT ... FOR UPDATE)."""
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _insert(conn: Connection, table: Table):
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


# A run's row made before its own "run" event is written (two collectors, or a status event first): results and
# events count into it at once, and save_run fills in its description later. Such a row has no dataset hash.
UNREGISTERED = ""
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
    ledger = _Ledger()
    incoming = _latest_per_row(batch, ledger)
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


# NaN or infinity raises ValueError here: the batch's free-form values are then made storable first.
_encode_strict = json.JSONEncoder(allow_nan=False).encode


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


def _latest_per_row(batch: Sequence[Result], ledger: _Ledger) -> dict[tuple[str, str], dict[str, Any]]:
    """Each row's result to write: the one that wins among the batch's results for that row."""
    rows = list(map(_row_of, batch))
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


RUNNING, COMPLETED = "running", "completed"
FINAL_STATUSES = {"completed", "cancelled", "budget_exhausted"}


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


def get_run(conn: Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(runs).where(runs.c.run_id == run_id)).mappings().first()
    return dict(row) if row else None


def list_runs(conn: Connection, limit: int = 20) -> list[dict[str, Any]]:
    query = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
    return [dict(r) for r in conn.execute(query).mappings()]


def result_keys(conn: Connection, run_id: str, status: str | None = None) -> set[str]:
    query = select(results.c.row_key).where(results.c.run_id == run_id)
    if status is not None:
        query = query.where(results.c.status == status)
    return {r[0] for r in conn.execute(query)}


def iter_results(conn: Connection, run_id: str, batch: int = 5000) -> Iterator[dict[str, Any]]:
    """Results in input order, streamed from the database in pages (keyset pagination on row_index)."""
    last = -1
    while True:
        query = (
            select(results)
            .where(results.c.run_id == run_id, results.c.row_index > last)
            .order_by(results.c.row_index)
            .limit(batch)
        )
        page = [dict(r) for r in conn.execute(query).mappings()]
        if not page:
            return
        yield from page
        last = page[-1]["row_index"]


@contextmanager
def result_pages(
    conn: Connection, run_id: str, columns: Sequence[str], page: int = 5000, as_text: Sequence[str] = ()
) -> Iterator[Iterator[list[tuple[Any, ...]]]]:
    """The given columns of the run's results in input order, for ``with result_pages(...) as pages``: one
    query by the (run_id, row_index) index, handed out ``page`` rows at a time as the driver's own tuples (no
    SQLAlchemy rows: building them cost a third of export's time), so values come as the driver gives them
    (SQLite: booleans as 0 and 1). JSON columns named in ``as_text`` come as their stored text, not decoded.
    Streamed, never whole in memory (see ``_driver_pages``). Inside the block the connection serves no other
    query (psycopg holds it while the server sends the rows); leaving the block before the last page cancels
    the query, which on PostgreSQL leaves the connection's transaction to be rolled back."""
    picked = [cast(results.c[name], Text) if name in as_text else results.c[name] for name in columns]
    query = select(*picked).where(results.c.run_id == run_id).order_by(results.c.row_index)
    compiled = query.compile(dialect=conn.dialect)
    params = compiled.construct_params()
    arguments = tuple(params[name] for name in compiled.positiontup or ()) if compiled.positional else params
    pages = _driver_pages(conn, str(compiled), arguments, page)
    try:
        yield pages
    finally:
        pages.close()


def _driver_pages(conn: Connection, sql: str, arguments: Any, page: int) -> Generator[list[tuple[Any, ...]]]:
    """The query's rows ``page`` at a time from a DBAPI cursor on the connection's driver connection. With
    psycopg on libpq 17 or later the server sends them unasked, ``page`` rows a chunk (libpq's chunked rows
    mode), so it reads and encodes the next rows while the caller writes a page. A named cursor, the way with
    psycopg2 or an older libpq, leaves the server idle while the caller works and the caller waiting while
    each ``FETCH`` runs: on PostgreSQL 15, fetching export's 1,000,000 rows alone cost the server 1.2 us/row
    by a named cursor, 1.0 streamed, and the client 0.9 either way. SQLite steps through the query itself."""
    driver: Any = conn.connection.driver_connection
    if _streams_in_chunks(conn):
        cursor = driver.cursor()
        rows = cursor.stream(sql, arguments, size=page)
        try:
            while chunk := list(islice(rows, page)):
                yield chunk
        finally:
            rows.close()  # before the cursor: cancels the query and drains what the server already sent
            cursor.close()
        return
    named = conn.dialect.name == "postgresql" and conn.dialect.driver in ("psycopg", "psycopg2")
    cursor = driver.cursor(name="result_pages") if named else driver.cursor()
    try:
        cursor.execute(sql, arguments)
        while chunk := cursor.fetchmany(page):
            yield chunk
    finally:
        cursor.close()


def _streams_in_chunks(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        return False
    import psycopg

    return psycopg.capabilities.has_stream_chunked()


def unfinished_rows(conn: Connection, run_id: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(row_key, row_index, input) of the run's failed rows and those retry-failed reopened, in input order,
    found by the (run_id, status) index."""
    query = (
        select(results.c.row_key, results.c.row_index, results.c.input)
        .where(results.c.run_id == run_id, results.c.status.in_((FAILED, RETRYING)))
        .order_by(results.c.row_index)
    )
    return [tuple(row) for row in conn.execute(query)]


def count_results(conn: Connection, run_id: str) -> dict[str, int]:
    query = select(results.c.status, func.count()).where(results.c.run_id == run_id).group_by(results.c.status)
    return {status: n for status, n in conn.execute(query)}


def result_statuses(conn: Connection, run_id: str, batch: int = 5000) -> Iterator[tuple[str, str]]:
    """(row_key, status) of the run's results in input order, paged like ``iter_results`` but without the
    row contents: what ``resume`` needs to rebuild a run's done rows."""
    last = -1
    while True:
        query = (
            select(results.c.row_index, results.c.row_key, results.c.status)
            .where(results.c.run_id == run_id, results.c.row_index > last)
            .order_by(results.c.row_index)
            .limit(batch)
        )
        page = conn.execute(query).all()
        if not page:
            return
        for _, row_key, status in page:
            yield row_key, status
        last = page[-1][0]


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


def chunk_batches(conn: Connection, run_id: str, chunk_no: str) -> list[dict[str, Any]]:
    """The recorded batches of a chunk number (``c000007``) of the run, under every label it was sent with
    (``c000007``, ``g2-c000007`` ...), oldest first."""
    query = (
        select(batches)
        .where(batches.c.run_id == run_id, (batches.c.chunk == chunk_no) | batches.c.chunk.like(f"%-{chunk_no}"))
        .order_by(batches.c.created_at, batches.c.chunk)
    )
    return [dict(r) for r in conn.execute(query).mappings()]
