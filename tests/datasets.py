"""Small datasets with the awkward parts real files have: quotes, commas, newlines, non-ASCII."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TRICKY = [
    "plain text",
    "comma, inside",
    'a "quoted" word',
    "line one\nline two",
    "café — naïve — 日本語 — 🙂",
    'it\'s, "all"\nat once ü',
]


def tricky_rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"id-{i:05d}", "text": f"{TRICKY[i % len(TRICKY)]} #{i}"} for i in range(n)]


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the path's extension names."""
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=max(1, len(rows) // 3))
    else:
        raise ValueError(path)
    return path
