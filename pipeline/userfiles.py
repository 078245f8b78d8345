"""The small text files users hand over besides the dataset: templates, JSON schemas, runs files."""
from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def read_text(path: Path, what: str) -> str:
    """The file's UTF-8 text, or a one-line ConfigError naming the file and what it was meant to be."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
