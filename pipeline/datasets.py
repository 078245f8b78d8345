"""Open, validate and stream CSV / JSONL / Parquet datasets in chunks, never holding the whole file."""
from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import json
import math
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DatasetError
from .records import Row

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
READ_BATCH = 10_000
MAX_ID_LENGTH = 512  # the results table's row_key column


@dataclass(frozen=True)
class DatasetSummary:
    """What the validating pass learned about a dataset."""

    path: Path
    format: str
    columns: list[str]
    rows: int
    sha256: str


def dataset_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise DatasetError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use one of {known}")
    return fmt


def check_path(path: Path, allowed_dir: Path | None = None) -> Path:
    """Resolve ``path`` and refuse it if missing, not a file, of unknown type or outside ``allowed_dir``."""
    resolved = path.expanduser().resolve()
    if allowed_dir is not None and not resolved.is_relative_to(allowed_dir.expanduser().resolve()):
        raise DatasetError(f"{path}: outside the allowed data directory {allowed_dir}")
    if not resolved.exists():
        raise DatasetError(f"{path}: no such file")
    if not resolved.is_file():
        raise DatasetError(f"{path}: not a file")
    dataset_format(resolved)
    return resolved


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """Turn a cell into something JSON can carry (job payloads and the results table are JSON)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN or infinity
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        reader = pd.read_csv(
            path, dtype=str, keep_default_na=False, chunksize=READ_BATCH, encoding="utf-8", on_bad_lines="error",
            skip_blank_lines=False,  # pandas would also drop lines of spaces, which are real values
        )
        for frame in reader:
            for record in frame.to_dict(orient="records"):
                if any(value != "" for value in record.values()):  # an empty line carries no row
                    yield record
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: empty file (no header and no rows)") from None
    except pd.errors.ParserError as exc:
        raise DatasetError(f"{path}: malformed CSV: {_first_line(exc)}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: malformed CSV: {exc}") from None


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{path}: line {line_no}: not valid UTF-8 at byte {exc.start}") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
            yield record


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=READ_BATCH):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: unreadable Parquet file ({_first_line(exc)})") from None


READERS: dict[str, Callable[[Path], Iterator[dict[str, Any]]]] = {
    "csv": _csv_records,
    "jsonl": _jsonl_records,
    "parquet": _parquet_records,
}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def iter_rows(path: Path, id_column: str | None = None) -> Iterator[Row]:
    """Stream the dataset's rows with their keys. Values are made JSON-safe."""
    try:
        for index, record in enumerate(READERS[dataset_format(path)](path)):
            values = {str(k): json_safe(v) for k, v in record.items()}
            yield Row(key=_row_key(path, index, values, id_column), index=index, values=values)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _row_key(path: Path, index: int, values: dict[str, Any], id_column: str | None) -> str:
    if id_column is None:
        return str(index)
    value = values.get(id_column)
    if value is None or value == "":
        raise DatasetError(f"{path}: row {index + 1}: id column {id_column!r} is missing or empty")
    key = str(value)
    if "\x00" in key:
        raise DatasetError(f"{path}: row {index + 1}: id in column {id_column!r} contains a NUL character")
    if len(key) > MAX_ID_LENGTH:
        raise DatasetError(f"{path}: row {index + 1}: id in column {id_column!r} is {len(key)} characters long, "
                           f"over the limit of {MAX_ID_LENGTH}")
    return key


def iter_chunks(path: Path, chunk_size: int, id_column: str | None = None) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in iter_rows(path, id_column):
        chunk.append(row)
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _IdHashes:
    """Duplicate-id detection in 8 bytes an id (a set of a million id strings takes about 100 MB): 64-bit
    hashes while streaming, then an exact look, in a second pass, at the few ids whose hash repeats."""

    def __init__(self) -> None:
        self._hashes = array("Q")

    def add(self, key: str) -> None:
        self._hashes.append(hash(key) & 0xFFFF_FFFF_FFFF_FFFF)

    def first_repeat(self, rows: Callable[[], Iterator[Row]]) -> Row | None:
        """The first row whose id an earlier row had, or None (a repeated hash may be a mere collision)."""
        ordered = np.frombuffer(self._hashes, dtype=np.uint64)
        ordered.sort()  # in place: no second copy of the hashes
        suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not suspects:
            return None
        seen: set[str] = set()
        for row in rows():
            if hash(row.key) & 0xFFFF_FFFF_FFFF_FFFF in suspects:
                if row.key in seen:
                    return row
                seen.add(row.key)
        return None


def scan(
    path: Path,
    *,
    id_column: str | None = None,
    max_row_bytes: int | None = None,
    check_row: Callable[[Row], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DatasetSummary:
    """The validating pass: read every row once, so that a bad file fails before anything is enqueued.

    Catches unreadable rows, duplicate or missing ids, oversized rows and whatever ``check_row`` rejects
    (the template check). Memory grows only by 8 bytes an id (for duplicate detection).
    """
    fmt = dataset_format(path)
    columns: dict[str, None] = {}
    ids = _IdHashes()
    count = 0
    for row in iter_rows(path, id_column):
        if id_column is not None and id_column not in row.values:
            raise DatasetError(f"{path}: id column {id_column!r} not found (columns: {', '.join(row.values)})")
        if id_column is not None:
            ids.add(row.key)
        if max_row_bytes is not None:
            size = len(json.dumps(row.values, ensure_ascii=False).encode("utf-8"))
            if size > max_row_bytes:
                raise DatasetError(f"{path}: row {row.index + 1}: {size} bytes, over the limit of {max_row_bytes}")
        for name in row.values:
            columns.setdefault(name, None)
        if check_row is not None:
            check_row(row)
        count += 1
        if progress is not None:
            progress(1)
    if count == 0:
        raise DatasetError(f"{path}: no rows (the file is empty or has only a header)")
    duplicate = ids.first_repeat(lambda: iter_rows(path, id_column))
    if duplicate is not None:
        raise DatasetError(f"{path}: row {duplicate.index + 1}: duplicate id {duplicate.key!r} in column {id_column!r}")
    return DatasetSummary(path=path, format=fmt, columns=list(columns), rows=count, sha256=file_sha256(path))
