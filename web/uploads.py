"""Uploaded datasets: streamed to disk under DATA_DIR/uploads as they arrive, kept under generated names.

Werkzeug's form parser writes each file part into the stream ``UploadRequest`` gives it: a temporary file in
``uploads/.incoming``, so an upload is never held in memory whatever its size (MAX_CONTENT_LENGTH bounds it).
An accepted upload is hard-linked to ``uploads/<random hex><suffix>``; the client's file name only chooses the
suffix, from an allow-list, so no name (``../../etc/passwd``) can place a file anywhere else.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO

from flask import Request, current_app
from werkzeug.datastructures import FileStorage

from .problems import problem

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
SNIFF_BYTES = 64 * 1024
PARQUET_MAGIC = b"PAR1"


class UploadRequest(Request):
    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return tempfile.NamedTemporaryFile("wb+", dir=incoming_dir(current_app.config["UPLOAD_DIR"]), prefix="part-")


def incoming_dir(upload_dir: Path) -> Path:
    path = upload_dir / ".incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


def display_name(filename: str | None) -> str:
    """The client's file name for people to read (never a path): its last part, printable, at most 200 chars."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:200] or "upload"


def store_upload(upload: FileStorage, upload_dir: Path) -> Path:
    """Check the upload's type by name and content and give it its generated name; raises 415 otherwise."""
    suffix = Path(display_name(upload.filename)).suffix.lower()
    kind = SUFFIXES.get(suffix)
    if kind is None:
        raise problem(
            415,
            f"{display_name(upload.filename)}: unsupported file type {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(SUFFIXES))}",
            "Unsupported Media Type",
        )
    _check_content(upload.stream, kind, display_name(upload.filename))
    upload_dir.mkdir(parents=True, exist_ok=True)
    destination = upload_dir / f"{uuid.uuid4().hex}{suffix}"
    source = getattr(upload.stream, "name", None)
    upload.stream.flush()
    if isinstance(source, str) and os.path.exists(source):
        os.link(source, destination)  # same directory tree: no copy; the temporary name goes when closed
    else:  # a stream the test client or a small part kept elsewhere: copy it in blocks
        upload.stream.seek(0)
        with destination.open("xb") as out:
            shutil.copyfileobj(upload.stream, out, 1 << 20)
    return destination


def _check_content(stream: IO[bytes], kind: str, name: str) -> None:
    stream.seek(0)
    head = stream.read(SNIFF_BYTES)
    if not head:
        raise problem(422, f"{name}: empty file", "Unprocessable Content")
    if kind == "parquet":
        stream.seek(-len(PARQUET_MAGIC), os.SEEK_END)
        if not head.startswith(PARQUET_MAGIC) or stream.read() != PARQUET_MAGIC:
            raise problem(415, f"{name}: not a Parquet file (no PAR1 header and footer)", "Unsupported Media Type")
    else:
        _check_text(head, kind, name)
    stream.seek(0)


def _check_text(head: bytes, kind: str, name: str) -> None:
    """CSV and JSONL are UTF-8 text: a binary file (a NUL byte, invalid UTF-8) is refused before any parsing;
    the dataset reader then checks every row as it does for the CLI."""
    if b"\x00" in head:
        raise problem(415, f"{name}: binary content, not {kind.upper()} text", "Unsupported Media Type")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise problem(415, f"{name}: not UTF-8 text (byte {exc.start})", "Unsupported Media Type") from None
    if kind == "jsonl" and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        raise problem(415, f"{name}: line 1: expected a JSON object", "Unsupported Media Type")
