"""Export a run's results (input columns joined with the answer) to CSV, JSONL or Parquet, streamed by page.

CSV files end up in spreadsheets, and both the dataset and the LLM's answers (which a dataset can steer) are
untrusted: a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return would be read as a
formula. So CSV text cells that start so are prefixed with a single quote (OWASP's CSV injection rule) unless
``raw`` is asked for; JSONL and Parquet are data formats, never evaluated, and stay raw.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from . import store
from .errors import ConfigError
from .pricing import NANO

OUTPUT_FIELDS = ["row_key", "status", "answer", "parsed_json", "error", "provider", "model", "input_tokens",
                 "output_tokens", "cost_usd", "latency_ms", "cached", "attempts"]
FORMATS = ("csv", "jsonl", "parquet")
PAGE = 5000
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _flat(result: dict[str, Any], input_columns: list[str]) -> dict[str, Any]:
    row = {name: result["input"].get(name) for name in input_columns}
    out = {
        "row_key": result["row_key"], "status": result["status"], "answer": result["answer"],
        "parsed_json": None if result["parsed"] is None else json.dumps(result["parsed"], ensure_ascii=False),
        "error": result["error"], "provider": result["provider"], "model": result["model"],
        "input_tokens": result["input_tokens"], "output_tokens": result["output_tokens"],
        "cost_usd": None if result["cost_nano"] is None else result["cost_nano"] / NANO,
        "latency_ms": result["latency_ms"], "cached": bool(result["cached"]),
        "attempts": result["attempts"],
        "usage_estimated": result["usage_estimated"],  # answers billed at their worst case (no usage reported)
    }
    for name, value in out.items():
        row[name + "_llm" if name in row else name] = value
    return row


def export_run(engine: Engine, run_id: str, fmt: str, destination: Path, *, raw: bool = False) -> int:
    """Write every result of the run in input order. Returns the number of rows written. ``raw``: CSV cells
    are written as they are, without the formula escaping."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    with engine.connect() as conn:
        if store.get_run(conn, run_id) is None:
            raise ConfigError(f"no run {run_id!r} in the database (is the collector running?)")
        results = store.iter_results(conn, run_id, batch=PAGE)
        first = list(islice(results, PAGE))
        columns: dict[str, None] = {}
        for result in first:
            columns.update(dict.fromkeys(result["input"]))
        pages = _pages(first, results, list(columns))
        if fmt == "csv":
            return _write_csv(pages if raw else (list(map(_defuse_row, page)) for page in pages), destination)
        writer = {"jsonl": _write_jsonl, "parquet": _write_parquet}[fmt]
        return writer(pages, destination)


def defuse_cell(value: Any) -> Any:
    """A text cell a spreadsheet would read as a formula, prefixed with a single quote; anything else as is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def _defuse_row(row: dict[str, Any]) -> dict[str, Any]:
    return {defuse_cell(name): defuse_cell(value) for name, value in row.items()}  # headers come from the dataset


def _pages(first: list[dict[str, Any]], rest: Iterator[dict[str, Any]], columns: list[str]
           ) -> Iterator[list[dict[str, Any]]]:
    if first:
        yield [_flat(r, columns) for r in first]
    while page := list(islice(rest, PAGE)):
        yield [_flat(r, columns) for r in page]


def _write_csv(pages: Iterator[list[dict[str, Any]]], destination: Path) -> int:
    count = 0
    with destination.open("w", newline="", encoding="utf-8") as handle:
        writer: csv.DictWriter | None = None
        for page in pages:
            if writer is None:
                writer = csv.DictWriter(handle, fieldnames=list(page[0]), extrasaction="ignore")
                writer.writeheader()
            writer.writerows(page)
            count += len(page)
    return count


def _write_jsonl(pages: Iterator[list[dict[str, Any]]], destination: Path) -> int:
    count = 0
    with destination.open("w", encoding="utf-8") as handle:
        for page in pages:
            for row in page:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            count += len(page)
    return count


def _write_parquet(pages: Iterator[list[dict[str, Any]]], destination: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    count, writer = 0, None
    try:
        for page in pages:
            if writer is None:
                schema = pa.Table.from_pylist(page).schema
                schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in schema])
                writer = pq.ParquetWriter(destination, schema)
            writer.write_table(pa.Table.from_pylist(page, schema=writer.schema))
            count += len(page)
    finally:
        if writer is not None:
            writer.close()
    return count
