"""The small text files users hand over besides the dataset: templates, JSON schemas, runs files."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError


def read_text(path: Path, what: str, allowed_dir: Path | None = None) -> str:
    """The file's UTF-8 text, or a one-line ConfigError naming the file and what it was meant to be.
    With ``allowed_dir`` (ALLOWED_DATA_DIR), a file outside it is refused before it is opened: a template's
    text is sent to the provider, so reading any file would leak it."""
    if allowed_dir is not None and not path.expanduser().resolve().is_relative_to(allowed_dir.expanduser().resolve()):
        raise ConfigError(f"{path}: {what} outside the allowed data directory {allowed_dir}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
