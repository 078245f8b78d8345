"""The provider interface: a request in, a response or a typed error out. No queues, no storage."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard


@dataclass(frozen=True)
class ProviderRequest:
    prompt: str
    model: str
    max_tokens: int = 256
    system: str | None = None
    temperature: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    json_schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RateLimitState:
    """What the provider's rate-limit headers said about the budget left (None = not reported)."""

    remaining_requests: float | None = None
    remaining_tokens: float | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None


@dataclass(frozen=True)
class ProviderResponse:
    text: str
    input_tokens: int
    output_tokens: int
    model: str
    rate_limit: RateLimitState | None = None
    usage_reported: bool = True  # False: the provider sent no usage (tokens 0); the caller bills an estimate


def usage_counts(usage: Any, input_name: str, output_name: str) -> tuple[int, int, bool]:
    """(input tokens, output tokens, reported) from a response's usage object; a missing or partial one (an
    OpenAI-compatible server that omits it) is not reported, never zero tokens."""
    if not isinstance(usage, Mapping):
        return 0, 0, False
    tokens_in, tokens_out = usage.get(input_name), usage.get(output_name)
    if not (_is_count(tokens_in) and _is_count(tokens_out)):
        return 0, 0, False
    return tokens_in, tokens_out, True


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Provider(Protocol):
    name: str

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Answer one request or raise a RetryableError / PermanentError."""

    async def aclose(self) -> None: ...


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds from OpenAI-style '1m30s' / '120ms' / '2.5s', a bare number, or an RFC 3339 / HTTP date."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        return sum(float(n) * scale[u] for n, u in parts)
    return _seconds_until(text)


def _seconds_until(text: str) -> float | None:
    from datetime import datetime

    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(text) if _looks_like_http_date(text) else None
        if parsed is None:
            return None
        when = parsed.timestamp()
    return max(0.0, when - time.time())


def _looks_like_http_date(text: str) -> bool:
    try:
        return email.utils.parsedate_to_datetime(text) is not None
    except (TypeError, ValueError):
        return False


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The server's requested wait: ``retry-after-ms`` first, then ``retry-after`` (seconds or HTTP date).
    A value that is not a finite number (``inf``, ``nan``) is no wait at all: the caller backs off as usual."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            wait_ms = float(millis) / 1000.0
        except ValueError:
            wait_ms = math.nan
        if math.isfinite(wait_ms):
            return max(0.0, wait_ms)
    wait = parse_duration(headers.get("retry-after"))
    return wait if wait is None or math.isfinite(wait) else None


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def rate_limit_state(headers: Mapping[str, str], *, style: str) -> RateLimitState | None:
    """Read OpenAI (``x-ratelimit-*``) or Anthropic (``anthropic-ratelimit-*``) budget headers."""
    if style == "openai":
        names = (
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
        )
    else:
        names = (
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-requests-reset",
            "anthropic-ratelimit-tokens-reset",
        )
    rem_req, rem_tok, reset_req, reset_tok = (headers.get(n) for n in names)
    if rem_req is None and rem_tok is None:
        return None
    return RateLimitState(_number(rem_req), _number(rem_tok), parse_duration(reset_req), parse_duration(reset_tok))
