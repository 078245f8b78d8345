"""Export a run's results (input columns joined with the answer) to CSV, JSONL or Parquet, streamed by page.

CSV files end up in spreadsheets, and both the dataset and the LLM's answers (which a dataset can steer) are
untrusted: a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return would be read as a
formula. So CSV text cells that start so are prefixed with a single quote (OWASP's CSV injection rule) unless
``raw`` is asked for; JSONL and Parquet are data formats, never evaluated, and stay raw.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from . import store
from .errors import ConfigError
from .pricing import NANO

OUTPUT_FIELDS = [
    "row_key",
    "status",
    "answer",
    "parsed_json",
    "error",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms",
    "cached",
    "attempts",
    "usage_estimated",
]
FORMATS = ("csv", "jsonl", "parquet")
STREAM_FORMATS = ("csv", "jsonl")  # Parquet is not: its footer, written last, holds the schema and offsets
PAGE = 5000
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


# What each output field is made of: the results column it reads (by position in _COLUMNS below).
_COLUMNS = [
    "input",
    "row_key",
    "status",
    "answer",
    "parsed",
    "error",
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_nano",
    "latency_ms",
    "cached",
    "attempts",
    "usage_estimated",
]
Page = list[list[Any]]


def _flat_page(rows: Sequence[Sequence[Any]], input_columns: list[str]) -> Page:
    """Result rows (the _COLUMNS of ``results``, JSON as its text) as output rows: the input columns, then
    OUTPUT_FIELDS."""
    loads, page = json.loads, []
    for (
        values,
        row_key,
        status,
        answer,
        parsed,
        error,
        provider,
        model,
        input_tokens,
        output_tokens,
        cost_nano,
        latency_ms,
        cached,
        attempts,
        usage_estimated,
    ) in rows:
        values = loads(values)
        flat = [values.get(name) for name in input_columns]
        flat += [
            row_key,
            status,
            answer,
            _parsed_json(parsed),
            error,
            provider,
            model,
            input_tokens,
            output_tokens,
            None if cost_nano is None else cost_nano / NANO,
            latency_ms,
            bool(cached),
            attempts,
            usage_estimated,
        ]  # answers billed at their worst case (no usage reported)
        page.append(flat)
    return page


def _parsed_json(stored: str | None) -> str | None:
    """The parsed answer as JSON text with its characters as they are. The column holds ``json.dumps`` text
    (ASCII, non-ASCII characters escaped, ``null`` for none): used as it is unless it has an escape."""
    if stored is None or stored == "null":
        return None
    return json.dumps(json.loads(stored), ensure_ascii=False) if "\\u" in stored else stored


def output_names(input_columns: list[str]) -> list[str]:
    """Input columns, then OUTPUT_FIELDS; a field whose name an input column has gets ``_llm`` added."""
    taken = set(input_columns)
    return input_columns + [name + "_llm" if name in taken else name for name in OUTPUT_FIELDS]


def export_run(engine: Engine, run_id: str, fmt: str, destination: Path, *, raw: bool = False) -> int:
    """Write every result of the run in input order. Returns the number of rows written. ``raw``: CSV cells
    are written as they are, without the formula escaping. One query streamed page by page: memory stays
    flat whatever the run's size. CSV and JSONL are the bytes ``export_chunks`` yields."""
    _check_format(fmt, FORMATS)
    with engine.connect() as conn:
        _require_run(conn, run_id)
        names, flat = _flat_pages(conn, run_id)
        if fmt == "parquet":
            return _write_parquet(names, flat, destination)
        count = 0
        with destination.open("wb") as handle:
            for data, rows in _encoded(names, flat, fmt, raw):
                handle.write(data)
                count += rows
        return count


def export_chunks(engine: Engine, run_id: str, fmt: str, *, raw: bool = False) -> Iterator[bytes]:
    """The CSV or JSONL export of the run as UTF-8 pages, for a response that streams it. The format and the
    run are checked now (ConfigError), before anything is yielded; the generator holds one connection while
    it is read and gives it back when it is exhausted or closed."""
    _check_format(fmt, STREAM_FORMATS)
    with engine.connect() as conn:
        _require_run(conn, run_id)
    return _chunks(engine, run_id, fmt, raw)


def _chunks(engine: Engine, run_id: str, fmt: str, raw: bool) -> Iterator[bytes]:
    with engine.connect() as conn:
        names, flat = _flat_pages(conn, run_id)
        for data, _ in _encoded(names, flat, fmt, raw):
            yield data


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(allowed)}")


def _require_run(conn: Connection, run_id: str) -> None:
    if store.get_run(conn, run_id) is None:
        raise ConfigError(f"no run {run_id!r} in the database (is the collector running?)")


def _flat_pages(conn: Connection, run_id: str) -> tuple[list[str], Iterator[Page]]:
    """The output column names (input columns from the first page) and the run's output rows page by page."""
    pages = store.result_pages(conn, run_id, _COLUMNS, PAGE, as_text=("input", "parsed"))
    first = next(pages, [])
    columns: dict[str, None] = {}
    for row in first:
        columns.update(dict.fromkeys(json.loads(row[0])))
    flat = (_flat_page(page, list(columns)) for page in chain([first], pages) if page)
    return output_names(list(columns)), flat


def _encoded(names: list[str], pages: Iterator[Page], fmt: str, raw: bool) -> Iterator[tuple[bytes, int]]:
    """Each page as UTF-8 CSV or JSONL with its row count (CSV's header first, with 0 rows)."""
    if fmt == "csv":
        return _csv_chunks(names, pages, raw)
    return _jsonl_chunks(names, pages)


def defuse_cell(value: Any) -> Any:
    """A text cell a spreadsheet would read as a formula, prefixed with a single quote; anything else as is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


# Output fields that never hold text (numbers, booleans) or only the pipeline's own words: never defused.
_NOT_TEXT = frozenset({"status", "input_tokens", "output_tokens", "cost_usd", "latency_ms", "cached", "attempts"})


def _defuse_page(page: Page, positions: list[int]) -> Page:
    """Defuse, in place, the cells at ``positions`` (the input columns and the text fields)."""
    for row in page:
        for i in positions:
            value = row[i]
            if value.__class__ is str and value.startswith(FORMULA_STARTS):
                row[i] = "'" + value
    return page


def _csv_chunks(names: list[str], pages: Iterator[Page], raw: bool) -> Iterator[tuple[bytes, int]]:
    fields = len(OUTPUT_FIELDS)
    positions = [
        i
        for i in range(len(names))
        if i < len(names) - fields or OUTPUT_FIELDS[i - len(names) + fields] not in _NOT_TEXT
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(names if raw else [defuse_cell(name) for name in names])  # headers come from the dataset
    yield _drain(buffer), 0
    for page in pages:
        writer.writerows(page if raw else _defuse_page(page, positions))
        yield _drain(buffer), len(page)


def _drain(buffer: io.StringIO) -> bytes:
    """What the buffer holds, UTF-8 encoded; the buffer is emptied for the next page."""
    data = buffer.getvalue().encode("utf-8")
    buffer.seek(0)
    buffer.truncate()
    return data


def _jsonl_chunks(names: list[str], pages: Iterator[Page]) -> Iterator[tuple[bytes, int]]:
    dumps = json.dumps
    for page in pages:
        text = "".join(dumps(dict(zip(names, row)), ensure_ascii=False, default=str) + "\n" for row in page)
        yield text.encode("utf-8"), len(page)


def _write_parquet(names: list[str], pages: Iterator[Page], destination: Path) -> int:
    """Column types are those pyarrow infers from the first page (text where a column is all empty there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count, writer = 0, None
    try:
        for page in pages:
            columns = list(zip(*page))
            if writer is None:
                arrays = [pa.array(column) for column in columns]
                arrays = [a.cast(pa.string()) if pa.types.is_null(a.type) else a for a in arrays]
                writer = pq.ParquetWriter(destination, pa.schema(list(zip(names, (a.type for a in arrays)))))
            else:
                arrays = [pa.array(column, type=field.type) for column, field in zip(columns, writer.schema)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=writer.schema))
            count += len(page)
    finally:
        if writer is not None:
            writer.close()
    return count
