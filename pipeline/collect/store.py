"""SQL tables (SQLAlchemy Core), the engine, and the queries the rest of the pipeline reads.

Only the collector writes to these tables (``pipeline.collect.writes``), each batch in one ``writing``
transaction. Money is integer nano-dollars (``cost_nano``), the unit the budget keeps in Redis: SQL sums are exact.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
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
    cast,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex

from pipeline.errors import ConfigError
from pipeline.records import FAILED, RETRYING

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

# A run's row made before its own "run" event is written (two collectors, or a status event first): results and
# events count into it at once, and save_run fills in its description later. Such a row has no dataset hash.
UNREGISTERED = ""
RUNNING, COMPLETED = "running", "completed"
FINAL_STATUSES = {"completed", "cancelled", "budget_exhausted"}

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


def chunk_batches(conn: Connection, run_id: str, chunk_no: str) -> list[dict[str, Any]]:
    """The recorded batches of a chunk number (``c000007``) of the run, under every label it was sent with
    (``c000007``, ``g2-c000007`` ...), oldest first."""
    query = (
        select(batches)
        .where(batches.c.run_id == run_id, (batches.c.chunk == chunk_no) | batches.c.chunk.like(f"%-{chunk_no}"))
        .order_by(batches.c.created_at, batches.c.chunk)
    )
    return [dict(r) for r in conn.execute(query).mappings()]
