"""Open, validate and stream CSV / JSONL / Parquet datasets in chunks, never holding the whole file.

Rows are read in batches by the libraries' own readers (pyarrow for CSV and Parquet, the C JSON scanner for
JSONL) and checked column by column; a row is turned into Python values once and serialized to JSON once, the
text the chunk job carries. Whenever the fast reader refuses a file (a malformed line, invalid UTF-8, a short
CSV row pandas would pad), the row-by-row reader takes over from the same row, so that what is accepted and
every error message stay those of the row-by-row reader.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from json.encoder import encode_basestring_ascii as json_text
from json.scanner import make_scanner
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.errors import DatasetError, TemplateError
from pipeline.intake.progress import BYTES, HASHING, READING, ProgressCallback, stage_reporter
from pipeline.intake.templates import PromptTemplate
from pipeline.records import Row, RowsJSON

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


def file_sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """The file's SHA-256; ``progress`` hears the bytes hashed so far."""
    digest = hashlib.sha256()
    hashed = 0
    if progress is not None:
        progress(0)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            hashed += len(block)
            if progress is not None:
                progress(hashed)
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


# ---------------------------------------------------------------- the row-by-row readers
# The reference for what a file means: the fast readers below fall back to these from the row they stopped at.


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    try:
        reader = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            chunksize=READ_BATCH,
            encoding="utf-8",
            on_bad_lines="error",
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


# ---------------------------------------------------------------- batches of rows

TEXT, NUMBER, ANY = "text", "number", "any"  # what a column's values are: all str, all int, any JSON-safe value
_encode = json.encoder.c_make_encoder(  # type: ignore[attr-defined]  # CPython's C encoder, no stub
    None, None, json_text, None, ": ", ", ", False, False, True
)
_encode_finite = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, None, json_text, None, ": ", ", ", False, False, False
)


def to_json(value: Any) -> str:
    """ASCII JSON of a JSON-safe value, as ``json.dumps`` writes it, without its per-call set-up."""
    return "".join(_encode(value, 0))


@dataclass
class Batch:
    """Consecutive rows read together: by column (CSV, Parquet), or as records whose keys may vary (JSONL and
    the row-by-row readers). Values are JSON-safe."""

    start: int  # index of the first row in the file's rows
    size: int
    names: list[str]
    columns: list[list[Any]] = field(default_factory=list)  # by column: one list of values a name
    kinds: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] | None = None
    end_byte: int | None = None  # how far into the file the reader is, if it knows
    _jsons: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.size

    def values(self) -> list[dict[str, Any]]:
        if self.records is not None:
            return self.records
        return [dict(zip(self.names, row)) for row in zip(*self.columns)] if self.names else [{}] * self.size

    def row_values(self, position: int) -> dict[str, Any]:
        if self.records is not None:
            return self.records[position]
        return {name: column[position] for name, column in zip(self.names, self.columns)}

    def column(self, name: str) -> tuple[list[Any], str] | None:
        """A column's values and kind; a record without the key gives None. None if no row has it."""
        if self.records is not None:
            if not any(map(dict.__contains__, self.records, _repeat(name))):
                return None
            return [r.get(name) for r in self.records], ANY
        if name not in self.names:
            return None
        at = self.names.index(name)
        return self.columns[at], self.kinds[at]

    def first_without(self, names: Sequence[str]) -> int | None:
        """The position of the first row that lacks one of ``names``, or None."""
        if self.records is None:
            return 0 if self.size and any(n not in self.names for n in names) else None
        for name in names:
            if not all(map(dict.__contains__, self.records, _repeat(name))):
                return min(i for n in names for i, r in enumerate(self.records) if n not in r)
        return None

    def row_jsons(self) -> list[str]:
        """Each row's values as ASCII JSON, serialized once and kept."""
        if self._jsons is None:
            self._jsons = self._records_json(self.records) if self.records is not None else self._columns_json()
        return self._jsons

    def _columns_json(self) -> list[str]:
        form = "{" + ", ".join(json_text(name).replace("%", "%%") + ": %s" for name in self.names) + "}"
        if not self.names:
            return ["{}"] * self.size
        encoded = [
            list(map(json_text, column))
            if kind == TEXT
            else list(map(str, column))
            if kind == NUMBER
            else list(map(to_json, column))
            for column, kind in zip(self.columns, self.kinds)
        ]
        return [form % row for row in zip(*encoded)]

    @staticmethod
    def _records_json(records: list[dict[str, Any]]) -> list[str]:
        jsons = []
        for at, record in enumerate(records):
            try:
                jsons.append("".join(_encode_finite(record, 0)))
            except ValueError:  # NaN or infinity somewhere in it: JSON has none, they become null
                records[at] = record = json_safe(record)
                jsons.append(to_json(record))
        return jsons


def _repeat(value: Any) -> Iterator[Any]:
    while True:
        yield value


class _Refused(Exception):
    """The fast reader cannot take this file any further; the row-by-row reader goes on from the same row."""


def _csv_batches(path: Path) -> Iterator[Batch]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header or "" in header or len(set(header)) != len(header):  # pandas renames such columns
        raise _Refused
    reader = pa_csv.open_csv(
        path,
        read_options=pa_csv.ReadOptions(block_size=1 << 20),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in header}, strings_can_be_null=False
        ),
    )
    if reader.schema.names != header or not all(pa.types.is_string(t) for t in reader.schema.types):
        raise _Refused
    start = 0
    # How far into the file: the reader reads ahead of the batches it hands out, so its position runs ahead of
    # the work; the batches' own bytes (values, plus a separator or line end after each) follow it closely.
    consumed = sum(len(name.encode("utf-8")) + 1 for name in header)
    for batch in reader:
        present = None
        consumed += batch.num_rows * len(header)
        for column in batch.columns:  # a line of empty cells carries no row (pandas reads it, we skip it)
            lengths = pc.binary_length(column)
            consumed += pc.sum(lengths).as_py() or 0
            filled = pc.greater(lengths, 0)
            present = filled if present is None else pc.or_(present, filled)
        if present is not None and not pc.all(present).as_py():
            batch = batch.filter(present)
        if batch.num_rows:
            yield Batch(
                start,
                batch.num_rows,
                list(header),
                [c.to_pylist() for c in batch.columns],
                [TEXT] * len(header),
                end_byte=consumed,
            )
            start += batch.num_rows


_SAFE_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_boolean, pa.types.is_null)


def _parquet_batches(path: Path) -> Iterator[Batch]:
    start = 0
    parquet = pq.ParquetFile(path)
    rows, size = parquet.metadata.num_rows, path.stat().st_size  # the bytes read, taken as in proportion to rows
    for batch in parquet.iter_batches(batch_size=READ_BATCH):
        names = [str(n) for n in batch.schema.names]
        if len(set(names)) != len(names):
            raise _Refused
        columns, kinds = [], []
        for array in batch.columns:
            kind = array.type.value_type if pa.types.is_dictionary(array.type) else array.type
            values = array.to_pylist()
            if not any(test(kind) for test in _SAFE_TYPES):
                values, kinds_of = [json_safe(v) for v in values], ANY
            elif array.null_count == 0 and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                kinds_of = TEXT
            elif array.null_count == 0 and pa.types.is_integer(kind):
                kinds_of = NUMBER
            else:
                kinds_of = ANY
            columns.append(values)
            kinds.append(kinds_of)
        if batch.num_rows:
            yield Batch(
                start, batch.num_rows, names, columns, kinds, end_byte=size * (start + batch.num_rows) // max(rows, 1)
            )
            start += batch.num_rows


def _jsonl_batches(path: Path) -> Iterator[Batch]:
    scan_object = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # the stub types the C scanner oddly
    start = 0
    with path.open("rb") as handle:
        while lines := handle.readlines(1 << 20):
            records = []
            for raw in lines:
                text = raw.decode("utf-8")
                if text[:1] != "{":
                    if not text.strip():
                        continue
                    raise _Refused  # not an object, or leading white space: the row-by-row reader decides
                try:
                    record, end = scan_object(text, 0)
                except (StopIteration, ValueError):
                    raise _Refused from None
                if end != len(text) and not text[end:].isspace():
                    raise _Refused
                records.append(record)
            if records:
                batch = Batch(start, len(records), [], records=records, end_byte=handle.tell())
                batch.row_jsons()  # NaN and infinity become null here, before anything looks at the values
                batch.names = list(dict.fromkeys(chain.from_iterable(records)))
                yield batch
                start += len(records)


FAST_READERS: dict[str, Callable[[Path], Iterator[Batch]]] = {
    "csv": _csv_batches,
    "jsonl": _jsonl_batches,
    "parquet": _parquet_batches,
}


def read_batches(path: Path) -> Iterator[Batch]:
    """Every row of the dataset, in batches. Raises DatasetError for a file the pipeline cannot use."""
    fmt = dataset_format(path)
    done = 0
    try:
        try:
            for batch in FAST_READERS[fmt](path):
                yield batch
                done += len(batch)
            return
        except (_Refused, pa.ArrowException, ValueError, UnicodeError, csv.Error, OSError):
            pass
        yield from _row_batches(path, fmt, done)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _row_batches(path: Path, fmt: str, skip: int) -> Iterator[Batch]:
    """The row-by-row reader's rows from row ``skip`` on, in batches."""
    records = islice(READERS[fmt](path), skip, None)
    start = skip
    while page := list(islice(records, READ_BATCH)):
        page = [{str(k): json_safe(v) for k, v in record.items()} for record in page]
        yield Batch(start, len(page), list(dict.fromkeys(chain.from_iterable(page))), records=page)
        start += len(page)


# ---------------------------------------------------------------- checks, each finding a batch's first bad row

Problem = tuple[int, str]  # (position in the batch, the message's end)


def batch_keys(batch: Batch, id_column: str | None) -> tuple[list[str], Problem | None]:
    """The rows' keys, and the first row whose id is missing, empty, has a NUL or is too long."""
    if id_column is None:
        return [str(i) for i in range(batch.start, batch.start + batch.size)], None
    found = batch.column(id_column)
    if found is None:
        return [], (0, f"id column {id_column!r} is missing or empty")
    column, kind = found
    keys: list[Any] = column if kind == TEXT else [None if v is None else str(v) for v in column]
    if None in keys or "" in keys or max(map(len, keys), default=0) > MAX_ID_LENGTH or "\x00" in "".join(keys):
        for at, value in enumerate(column):
            problem = _id_problem(value, id_column)
            if problem:
                return keys, (at, problem)
    return keys, None


def _id_problem(value: Any, id_column: str) -> str | None:
    if value is None or value == "":
        return f"id column {id_column!r} is missing or empty"
    key = str(value)
    if "\x00" in key:
        return f"id in column {id_column!r} contains a NUL character"
    if len(key) > MAX_ID_LENGTH:
        return f"id in column {id_column!r} is {len(key)} characters long, over the limit of {MAX_ID_LENGTH}"
    return None


def oversized(batch: Batch, max_row_bytes: int) -> Problem | None:
    """The first row whose values, as UTF-8 JSON, exceed ``max_row_bytes``. The ASCII JSON is never shorter,
    so only rows whose ASCII JSON is over the limit are measured exactly."""
    jsons = batch.row_jsons()
    if max(map(len, jsons), default=0) <= max_row_bytes:
        return None
    for at, text in enumerate(jsons):
        if len(text) > max_row_bytes:
            size = len(json.dumps(batch.row_values(at), ensure_ascii=False).encode("utf-8"))
            if size > max_row_bytes:
                return at, f"{size} bytes, over the limit of {max_row_bytes}"
    return None


def template_problem(batch: Batch, template: PromptTemplate) -> Problem | None:
    """The first row the template fails on or renders blank for. A template of plain ``{{ name }}`` outputs
    is checked by looking at the columns; any other is rendered row by row. The message is always that of
    rendering the row."""
    plain = template.plain_variables()
    if plain is None:
        for at, values in enumerate(batch.values()):
            if problem := render_problem(template, values):
                return at, problem
        return None
    names, blank_text = plain
    suspects = []
    if (missing := batch.first_without(names)) is not None:
        suspects.append(missing)
    if blank_text:
        suspects += _blank_rows(batch, names)
    for at in sorted(set(suspects)):
        if problem := render_problem(template, batch.row_values(at)):
            return at, problem
    return None


def _blank_rows(batch: Batch, names: list[str]) -> list[int]:
    """Positions of rows whose every named value is blank text (a blank template renders them blank)."""
    rows: list[int] | None = None
    for name in names:
        found = batch.column(name)
        if found is None:
            return []
        column = found[0]
        positions = rows if rows is not None else range(batch.size)
        rows = [i for i in positions if type(column[i]) is str and (not column[i] or column[i].isspace())]
    return rows if rows is not None else list(range(batch.size))  # no variables: the text alone is blank


def render_problem(template: PromptTemplate, values: dict[str, Any]) -> str | None:
    try:
        if not template.render(values).strip():
            return "the template renders an empty prompt"
    except TemplateError as exc:
        return str(exc)
    return None


def _raise_first(path: Path, batch: Batch, problems: Sequence[Problem | None]) -> None:
    """Raise the problem of the earliest row; for one row, the first check's (the order rows are checked in)."""
    found = [(at, order, text) for order, problem in enumerate(problems) if problem for at, text in [problem]]
    if found:
        at, _, text = min(found)
        raise DatasetError(f"{path}: row {batch.start + at + 1}: {text}")


# ---------------------------------------------------------------- rows and serialized chunks


def iter_rows(path: Path, id_column: str | None = None) -> Iterator[Row]:
    """Stream the dataset's rows with their keys. Values are made JSON-safe."""
    for batch in read_batches(path):
        keys, problem = batch_keys(batch, id_column)
        _raise_first(path, batch, [problem])
        for key, index, values in zip(keys, range(batch.start, batch.start + batch.size), batch.values()):
            yield Row(key=key, index=index, values=values)


def iter_chunks(path: Path, chunk_size: int, id_column: str | None = None) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in iter_rows(path, id_column):
        chunk.append(row)
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def row_entries(batch: Batch, keys: list[str]) -> list[str]:
    """Each row as the JSON of its entry in a chunk job's payload: ``{"key", "index", "values"}``."""
    return [
        f'{{"key": {key}, "index": {index}, "values": {values}}}'
        for key, index, values in zip(
            map(json_text, keys), range(batch.start, batch.start + batch.size), batch.row_jsons()
        )
    ]


class ChunkText:
    """Gathers row entries into chunks of ``size`` rows, each handed to ``emit`` as one RowsJSON."""

    def __init__(self, size: int, emit: Callable[[RowsJSON], None]) -> None:
        self.size, self.emit = size, emit
        self.pending: list[str] = []

    def add(self, entries: list[str]) -> None:
        self.pending += entries
        while len(self.pending) >= self.size:
            self.emit(RowsJSON(self.size, ", ".join(self.pending[: self.size])))
            del self.pending[: self.size]

    def close(self) -> None:
        if self.pending:
            self.emit(RowsJSON(len(self.pending), ", ".join(self.pending)))
            self.pending = []


def serialized_chunks(path: Path, chunk_size: int, id_column: str | None = None) -> Iterator[RowsJSON]:
    """The dataset as chunk payloads' row lists, without the validating pass's checks (ids still are)."""
    ready: list[RowsJSON] = []
    chunks = ChunkText(chunk_size, ready.append)
    for batch in read_batches(path):
        keys, problem = batch_keys(batch, id_column)
        _raise_first(path, batch, [problem])
        chunks.add(row_entries(batch, keys))
        yield from ready
        ready.clear()
    chunks.close()
    yield from ready


class _IdHashes:
    """Duplicate-id detection in 8 bytes an id (a set of a million id strings takes about 100 MB): 64-bit
    hashes while streaming, then an exact look, in a second pass, at the few ids whose hash repeats."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []

    def add(self, keys: Sequence[str]) -> None:
        self._parts.append(np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)))

    def first_repeat(self, rows: Callable[[], Iterator[Row]]) -> Row | None:
        """The first row whose id an earlier row had, or None (a repeated hash may be a mere collision)."""
        ordered = np.concatenate(self._parts) if self._parts else np.empty(0, dtype=np.int64)
        self._parts = []
        ordered.sort()  # in place: no second copy of the hashes
        suspects = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        if not suspects:
            return None
        seen: set[str] = set()
        for row in rows():
            if hash(row.key) in suspects:
                if row.key in seen:
                    return row
                seen.add(row.key)
        return None


def scan(
    path: Path,
    *,
    id_column: str | None = None,
    max_row_bytes: int | None = None,
    template: PromptTemplate | None = None,
    check_row: Callable[[Row], None] | None = None,
    progress: ProgressCallback | None = None,
    chunk_size: int | None = None,
    on_chunk: Callable[[RowsJSON], None] | None = None,
) -> DatasetSummary:
    """The validating pass: read every row once, so that a bad file fails before anything is enqueued.

    Catches unreadable rows, duplicate or missing ids, oversized rows, rows the ``template`` fails on or renders
    blank for, and whatever ``check_row`` rejects. With ``on_chunk``, each chunk of ``chunk_size`` rows is handed
    over serialized as its job will carry it, so the enqueue needs no second read. Memory grows only by 8 bytes
    an id (for duplicate detection). ``progress`` hears the bytes read, then the bytes hashed, of the file's size.
    """
    fmt = dataset_format(path)
    size = path.stat().st_size
    reading = stage_reporter(progress, READING, size, BYTES)
    if reading is not None:
        reading(0)  # the bar and its total show at once, before the first batch is read
    columns: dict[str, None] = {}
    ids = _IdHashes()
    count = 0
    chunks = ChunkText(chunk_size or READ_BATCH, on_chunk) if on_chunk is not None else None
    for batch in read_batches(path):
        keys, key_problem = batch_keys(batch, id_column)
        _raise_first(
            path,
            batch,
            [
                key_problem,
                None if max_row_bytes is None else oversized(batch, max_row_bytes),
                None if template is None else template_problem(batch, template),
            ],
        )
        if check_row is not None:
            for key, index, values in zip(keys, range(batch.start, batch.start + batch.size), batch.values()):
                check_row(Row(key, index, values))
        if id_column is not None:
            ids.add(keys)
        columns.update(dict.fromkeys(batch.names))
        if chunks is not None:
            chunks.add(row_entries(batch, keys))
        count += batch.size
        if reading is not None and batch.end_byte is not None:
            reading(batch.end_byte)
    if reading is not None:
        reading(size)
    if count == 0:
        raise DatasetError(f"{path}: no rows (the file is empty or has only a header)")
    duplicate = ids.first_repeat(lambda: iter_rows(path, id_column))
    if duplicate is not None:
        raise DatasetError(f"{path}: row {duplicate.index + 1}: duplicate id {duplicate.key!r} in column {id_column!r}")
    if chunks is not None:
        chunks.close()
    sha256 = file_sha256(path, stage_reporter(progress, HASHING, size, BYTES))
    return DatasetSummary(path=path, format=fmt, columns=list(columns), rows=count, sha256=sha256)
