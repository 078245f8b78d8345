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
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from itertools import chain, repeat
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from pipeline.collect import store
from pipeline.errors import ConfigError
from pipeline.output import jsonlines
from pipeline.pricing import NANO

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
# A page of output rows held by column (the input columns, then OUTPUT_FIELDS), each as long as the page:
# pyarrow takes the columns as they are, csv.writer and the JSONL encoder read the rows off them with zip().
Columns = list[Sequence[Any]]
Page = list[tuple[Any, ...]]  # rows of _COLUMNS as the driver gives them
# The C scanner json.loads ends in, called without the four Python calls around it.
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _decode_inputs(texts: Sequence[str]) -> list[Any]:
    """The stored JSON texts of a page's inputs, decoded as ``json.loads`` decodes them: by its C scanner, and
    by ``json.loads`` itself for a text the scanner does not read whole (whitespace around the value, say)."""
    scan, loads, decoded = _scan_json, json.loads, []
    for text in texts:
        try:
            value, end = scan(text, 0)
        except StopIteration:
            end = -1
        decoded.append(value if end == len(text) else loads(text))
    return decoded


def _page_columns(page: Sequence[Sequence[Any]], inputs: list[Any], input_columns: list[str]) -> Columns:
    """Result rows (the _COLUMNS of ``results``, JSON as its text) with their decoded inputs as the output
    columns. Built a column at a time: one loop a column instead of one list and fourteen stores a row."""
    by_column = list(zip(*page))
    columns: Columns = [list(map(dict.get, inputs, repeat(name))) for name in input_columns]
    columns += by_column[1:4]  # row_key, status, answer
    columns.append([None if p is None or p == "null" else p if "\\u" not in p else _unescaped(p) for p in by_column[4]])
    columns += by_column[5:10]  # error, provider, model, input_tokens, output_tokens
    columns.append([None if cost is None else cost / NANO for cost in by_column[10]])
    columns.append(by_column[11])  # latency_ms
    columns.append(list(map(bool, by_column[12])))  # cached: 0 and 1 on SQLite
    columns += by_column[13:]  # attempts, usage_estimated (answers billed at their worst case: no usage reported)
    return columns


def _unescaped(stored: str) -> str:
    """The parsed answer's JSON text with its characters as they are. The column holds ``json.dumps`` text
    (ASCII, non-ASCII characters escaped, ``null`` for none): it is used as it is unless it has an escape."""
    return json.dumps(json.loads(stored), ensure_ascii=False)


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
        with _result_pages(conn, run_id) as pages:
            return _write_file(pages, fmt, destination, raw)


def _write_file(pages: Iterator[Page], fmt: str, destination: Path, raw: bool) -> int:
    names, flat = _column_pages(pages)
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
    with engine.connect() as conn, _result_pages(conn, run_id) as pages:
        names, flat = _column_pages(pages)
        for data, _ in _encoded(names, flat, fmt, raw):
            yield data


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(allowed)}")


def _require_run(conn: Connection, run_id: str) -> None:
    if store.get_run(conn, run_id) is None:
        raise ConfigError(f"no run {run_id!r} in the database (is the collector running?)")


def _result_pages(conn: Connection, run_id: str) -> AbstractContextManager[Iterator[Page]]:
    return store.result_pages(conn, run_id, _COLUMNS, PAGE, as_text=("input", "parsed"))


def _column_pages(pages: Iterator[Page]) -> tuple[list[str], Iterator[Columns]]:
    """The output column names (input columns from the first page) and the run's output page by page."""
    decoded = ((page, _decode_inputs([row[0] for row in page])) for page in pages)
    first = next(decoded, None)
    if first is None:
        return output_names([]), iter(())
    columns: dict[str, None] = {}
    for values in first[1]:
        columns.update(dict.fromkeys(values))
    input_columns = list(columns)
    pages_out = (_page_columns(page, inputs, input_columns) for page, inputs in chain([first], decoded))
    return output_names(input_columns), pages_out


def _encoded(names: list[str], pages: Iterator[Columns], fmt: str, raw: bool) -> Iterator[tuple[bytes, int]]:
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
_NOT_TEXT = frozenset(
    {"status", "input_tokens", "output_tokens", "cost_usd", "latency_ms", "cached", "attempts", "usage_estimated"}
)


# A line after the first that starts as FORMULA_STARTS do (a search that starts with a literal is fast).
_FORMULA_LINE = re.compile("\n[" + re.escape("".join(FORMULA_STARTS)) + "]")


def _defused(column: Sequence[Any]) -> Sequence[Any]:
    """The column with every text cell a spreadsheet would read as a formula prefixed with a single quote.
    A column of text and empty cells is first searched whole, its cells joined by newlines: when no line
    starts so, no cell does, and the column is kept without a Python call per cell. Otherwise (a match, or a
    cell that is not text) the cells are looked at one by one."""
    try:
        text = "\n".join(filter(None, column))  # None and "" never need the quote
    except TypeError:
        pass
    else:
        if not text.startswith(FORMULA_STARTS) and not _FORMULA_LINE.search(text):
            return column
    starts = FORMULA_STARTS
    return [("'" + value) if value.__class__ is str and value.startswith(starts) else value for value in column]


def _csv_chunks(names: list[str], pages: Iterator[Columns], raw: bool) -> Iterator[tuple[bytes, int]]:
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
    for columns in pages:
        if not raw:
            for i in positions:
                columns[i] = _defused(columns[i])
        writer.writerows(zip(*columns))
        yield _drain(buffer), len(columns[-1])


def _drain(buffer: io.StringIO) -> bytes:
    """What the buffer holds, UTF-8 encoded; the buffer is emptied for the next page."""
    data = buffer.getvalue().encode("utf-8")
    buffer.seek(0)
    buffer.truncate()
    return data


def _jsonl_chunks(names: list[str], pages: Iterator[Columns]) -> Iterator[tuple[bytes, int]]:
    encode = jsonlines.page_encoder(names)
    for columns in pages:
        yield encode(columns).encode("utf-8"), len(columns[-1])


def _write_parquet(names: list[str], pages: Iterator[Columns], destination: Path) -> int:
    """Column types are those pyarrow infers from the first page; a column all empty there, or mixing types
    (an object in one row, text in another), is text, each value that is not text as its JSON. A later value
    that fits neither its column's type nor text stops the export with ConfigError naming the column, and the
    partial file is removed: nothing half-written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count, writer = 0, None
    try:
        for columns in pages:
            if writer is None:
                arrays = [_first_array(pa, column) for column in columns]
                writer = pq.ParquetWriter(destination, pa.schema(list(zip(names, (a.type for a in arrays)))))
            else:
                arrays = [
                    _page_array(pa, column, field, count) for column, field in zip(columns, writer.schema, strict=True)
                ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=writer.schema))
            count += len(columns[-1])
    except BaseException:
        if writer is not None:
            writer.close()
            writer = None
        destination.unlink(missing_ok=True)
        raise
    finally:
        if writer is not None:
            writer.close()
    return count


def _first_array(pa: Any, column: Sequence[Any]) -> Any:
    try:
        array = pa.array(column)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array(_as_text(column), type=pa.string())
    return array.cast(pa.string()) if pa.types.is_null(array.type) else array


def _page_array(pa: Any, column: Sequence[Any], field: Any, written: int) -> Any:
    try:
        return pa.array(column, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        if pa.types.is_string(field.type):
            return pa.array(_as_text(column), type=pa.string())
    raise ConfigError(
        f"Parquet export: column {field.name!r} is {field.type} in the first rows, but a row after row {written} "
        "holds a value of another type; export this run as JSONL or CSV"
    )


def _as_text(column: Sequence[Any]) -> list[str | None]:
    return [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str) for v in column]
