"""Keep secrets out of anything we write: error messages, logs, results and metrics."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Shapes of provider keys, caught even when we were not told the key (e.g. echoed back in a 401 body).
_KEY_SHAPES = re.compile(r"\b(sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{8,})")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"']+")

_known: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value (an API key) so ``redact`` removes it wherever it appears."""
    if value and len(value) >= 4:
        _known.add(value)


def register_secrets(values: Iterable[str | None]) -> None:
    for value in values:
        register_secret(value)


def redact(text: str) -> str:
    for secret in _known:
        text = text.replace(secret, "[REDACTED]")
    text = _KEY_SHAPES.sub("[REDACTED]", text)
    return _BEARER.sub(r"\1[REDACTED]", text)
