"""Translate the official SDKs' exceptions (openai and anthropic share one shape) into our typed errors."""

from __future__ import annotations

from types import ModuleType

from ..errors import PermanentError, ProviderError, ProviderTimeout, RateLimited, ServerError, UnreadableAnswer
from ..redaction import redact
from .base import retry_after

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}


def translate(exc: Exception, sdk: ModuleType, provider: str) -> ProviderError:
    """Map an SDK exception to RateLimited / ServerError / ProviderTimeout / PermanentError; a 2xx whose body
    has the wrong shape (a missing key, a wrong type) is an UnreadableAnswer; our own errors pass through."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, (KeyError, IndexError, TypeError, AttributeError)):
        return UnreadableAnswer(
            f"{provider}: unreadable answer ({type(exc).__name__}: {redact(str(exc))[:200]})", status=200
        )
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderTimeout(f"{provider}: request timed out")
    if isinstance(exc, sdk.APIConnectionError):
        return ServerError(f"{provider}: connection failed ({redact(str(exc))})")
    if isinstance(exc, sdk.APIResponseValidationError):
        return ServerError(f"{provider}: malformed response body", status=exc.status_code)
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        message = f"{provider}: HTTP {status}: {redact(_error_message(exc))}"
        wait = retry_after(exc.response.headers)
        if status == 429:
            return RateLimited(message, status=status, retry_after=wait)
        if status in RETRYABLE_STATUS or status >= 500:
            return ServerError(message, status=status, retry_after=wait)
        return PermanentError(message, status=status)
    return ServerError(f"{provider}: {type(exc).__name__}: {redact(str(exc))}")


def _error_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))
