"""The providers' batch APIs through their official SDKs: OpenAI Batch (a JSONL file, then a batch) and Anthropic
Message Batches. Create, find again, read the state, read the items' outcomes, cancel. No queue, no storage.

Every SDK failure leaves as one of our typed errors (``sdk_errors.translate``). An OpenAI batch carries the
chunk's id in its metadata, so a chunk that runs again can find it; an Anthropic batch has no metadata, so it is
found by its creation time and size, and, once ended, by the chunk's prefix on its custom_ids.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ..errors import ProviderError
from ..settings import Settings
from .base import ProviderRequest, ProviderResponse
from .sdk_errors import translate

# What our status, metrics and poll job call a batch's state, whatever the provider names it.
CREATED, IN_PROGRESS, COMPLETED, EXPIRED, CANCELLED, FAILED = (
    "created",
    "in_progress",
    "completed",
    "expired",
    "cancelled",
    "failed",
)
OPEN_STATES = (CREATED, IN_PROGRESS)
STATES = (CREATED, IN_PROGRESS, COMPLETED, EXPIRED, CANCELLED, FAILED)
LIST_PAGE = 100
# Per batch: most requests, and most bytes of its input (OpenAI's JSONL file; Anthropic's request body).
LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024)}
CLOCK_SKEW_SECONDS = 60.0  # a batch found by its creation time may be stamped this much before our intent
UPLOAD_TIMEOUT_FACTOR = 4  # the batch clients' timeout, in REQUEST_TIMEOUTs
UPLOAD_RETRIES = 2  # the SDK's retries of an upload or a read (never of a create)


@dataclass(frozen=True)
class BatchItem:
    custom_id: str
    request: ProviderRequest


@dataclass(frozen=True)
class BatchInfo:
    id: str
    state: str
    created_at: float
    expires_at: float | None
    refused: str | None = None  # the provider refused it for its enqueued-token limit: wait, then again


@dataclass(frozen=True)
class ItemOutcome:
    """One item of an ended batch: an answer, or an error that another round may fix (``retryable``) or not."""

    custom_id: str
    response: ProviderResponse | None = None
    error: str | None = None
    retryable: bool = False
    cancelled: bool = False  # never run because the batch was cancelled: left for ``resume``


class BatchAPI(Protocol):
    name: str
    base_url: str  # the server the client posts to, as in the online provider's response-cache key

    def create(self, chunk_id: str, items: Sequence[BatchItem]) -> str: ...

    def find(
        self, chunk_id: str, prefix: str, count: int, since: float, taken: Callable[[str], bool]
    ) -> str | None: ...

    def retrieve(self, batch_id: str) -> BatchInfo: ...

    def outcomes(self, batch_id: str) -> Iterator[ItemOutcome]: ...

    def cancel(self, batch_id: str) -> None: ...


def build_batch_api(name: str, settings: Settings) -> BatchAPI:
    """The batch API of ``openai`` or ``anthropic`` with the worker's keys and base URLs."""
    timeout = UPLOAD_TIMEOUT_FACTOR * settings.request_timeout  # an upload of a large file takes longer than a call
    if name == "openai":
        import openai

        assert settings.openai_api_key is not None
        return OpenAIBatches(
            openai.OpenAI(
                api_key=settings.openai_api_key.get_secret_value(),
                base_url=settings.openai_base_url,
                timeout=timeout,
                max_retries=UPLOAD_RETRIES,
            )
        )
    if name == "anthropic":
        import anthropic

        assert settings.anthropic_api_key is not None
        return AnthropicBatches(
            anthropic.Anthropic(
                api_key=settings.anthropic_api_key.get_secret_value(),
                base_url=settings.anthropic_base_url,
                timeout=timeout,
                max_retries=UPLOAD_RETRIES,
            )
        )
    raise ProviderError(f"provider {name} has no batch API")


def _typed(sdk_name: str, provider: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn an SDK exception raised by the wrapped method into our typed error."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            import importlib

            try:
                return method(*args, **kwargs)
            except Exception as exc:
                raise translate(exc, importlib.import_module(sdk_name), provider) from None

        call.__doc__ = method.__doc__
        return call

    return wrap


class OpenAIBatches:
    name = "openai"
    ENDPOINT = "/v1/chat/completions"

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = str(client.base_url)  # as the online provider's: the response cache is shared

    @_typed("openai", "openai")
    def create(self, chunk_id: str, items: Sequence[BatchItem]) -> str:
        from .openai import OpenAIProvider

        lines = (
            json.dumps(
                {
                    "custom_id": item.custom_id,
                    "method": "POST",
                    "url": self.ENDPOINT,
                    "body": OpenAIProvider._arguments(item.request),
                },
                ensure_ascii=False,
            )
            for item in items
        )
        data = ("\n".join(lines) + "\n").encode("utf-8")
        uploaded = self.client.files.create(
            file=("chunk.jsonl", io.BytesIO(data), "application/jsonl"), purpose="batch"
        )
        # never retried by the SDK: a create whose reply was lost may have made the batch (found again instead)
        batch = self.client.with_options(max_retries=0).batches.create(
            input_file_id=uploaded.id, endpoint=self.ENDPOINT, completion_window="24h", metadata={"chunk_id": chunk_id}
        )
        return batch.id

    @_typed("openai", "openai")
    def find(self, chunk_id: str, prefix: str, count: int, since: float, taken: Callable[[str], bool]) -> str | None:
        """The newest batch whose metadata names this chunk (newest first, back to the intent's time)."""
        for batch in self.client.batches.list(limit=LIST_PAGE):
            if batch.created_at < since - CLOCK_SKEW_SECONDS:
                return None
            if (batch.metadata or {}).get("chunk_id") == chunk_id:
                return batch.id
        return None

    @_typed("openai", "openai")
    def retrieve(self, batch_id: str) -> BatchInfo:
        batch = self.client.batches.retrieve(batch_id)
        state = {
            "validating": CREATED,
            "in_progress": IN_PROGRESS,
            "finalizing": IN_PROGRESS,
            "cancelling": IN_PROGRESS,
            "completed": COMPLETED,
            "expired": EXPIRED,
            "cancelled": CANCELLED,
            "failed": FAILED,
        }.get(batch.status, IN_PROGRESS)
        refused = None
        errors = getattr(batch.errors, "data", None) or []
        if state == FAILED and any(e.code == "token_limit_exceeded" for e in errors):
            refused = next(e.message for e in errors if e.code == "token_limit_exceeded") or "token_limit_exceeded"
        return BatchInfo(
            batch.id, state, float(batch.created_at), float(batch.expires_at) if batch.expires_at else None, refused
        )

    @_typed("openai", "openai")
    def outcomes(self, batch_id: str) -> Iterator[ItemOutcome]:
        batch = self.client.batches.retrieve(batch_id)
        found: list[ItemOutcome] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                text = self.client.files.content(file_id).text
                found += [_openai_outcome(json.loads(line)) for line in text.splitlines() if line.strip()]
        return iter(found)

    @_typed("openai", "openai")
    def cancel(self, batch_id: str) -> None:
        self.client.batches.cancel(batch_id)


def _openai_outcome(line: dict[str, Any]) -> ItemOutcome:
    custom_id = str(line.get("custom_id"))
    response, error = line.get("response"), line.get("error")
    if response and response.get("status_code") == 200:
        body = response["body"]
        usage = body.get("usage") or {}
        return ItemOutcome(
            custom_id,
            ProviderResponse(
                text=body["choices"][0]["message"].get("content") or "",
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                model=body.get("model") or "",
            ),
        )
    if response:
        status = int(response.get("status_code") or 0)
        message = ((response.get("body") or {}).get("error") or {}).get("message", "")
        return ItemOutcome(
            custom_id, error=f"openai batch: HTTP {status}: {message}"[:2000], retryable=status == 429 or status >= 500
        )
    code = (error or {}).get("code", "unknown")
    return ItemOutcome(
        custom_id,
        error=f"openai batch: {code}: {(error or {}).get('message', '')}"[:2000],
        retryable=code != "batch_cancelled",
        cancelled=code == "batch_cancelled",
    )


class AnthropicBatches:
    name = "anthropic"

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = str(client.base_url)  # as the online provider's: the response cache is shared

    @_typed("anthropic", "anthropic")
    def create(self, chunk_id: str, items: Sequence[BatchItem]) -> str:
        from .anthropic import AnthropicProvider

        requests = [
            {"custom_id": item.custom_id, "params": AnthropicProvider._arguments(item.request)} for item in items
        ]
        # never retried by the SDK: a create whose reply was lost may have made the batch (found again instead)
        return self.client.with_options(max_retries=0).messages.batches.create(requests=requests).id

    @_typed("anthropic", "anthropic")
    def find(self, chunk_id: str, prefix: str, count: int, since: float, taken: Callable[[str], bool]) -> str | None:
        """No metadata: a batch made after the intent with as many requests, not recorded by another chunk; an
        ended one must carry the chunk's custom_id prefix. An in-progress candidate is taken only if it is the
        only one (two chunks of one size created at once can be told apart only once they end)."""
        candidates = []
        for batch in self.client.messages.batches.list(limit=LIST_PAGE):
            created = batch.created_at.timestamp()
            if created < since - CLOCK_SKEW_SECONDS:
                break
            counts = batch.request_counts
            size = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
            if size != count or taken(batch.id):
                continue
            if batch.processing_status == "ended":
                first = next(iter(self.client.messages.batches.results(batch.id)), None)
                if first is not None and first.custom_id.startswith(prefix):
                    return batch.id
                continue
            candidates.append(batch.id)
        if len(candidates) > 1:
            raise ProviderError(
                f"anthropic: {len(candidates)} unrecorded batches could be chunk {chunk_id}'s; "
                "looking again once they end"
            )
        return candidates[0] if candidates else None

    @_typed("anthropic", "anthropic")
    def retrieve(self, batch_id: str) -> BatchInfo:
        batch = self.client.messages.batches.retrieve(batch_id)
        counts = batch.request_counts
        if batch.processing_status != "ended":
            state = IN_PROGRESS
        elif batch.cancel_initiated_at is not None:
            state = CANCELLED
        elif counts.expired:
            state = EXPIRED
        else:
            state = COMPLETED
        return BatchInfo(batch.id, state, batch.created_at.timestamp(), _stamp(batch.expires_at))

    @_typed("anthropic", "anthropic")
    def outcomes(self, batch_id: str) -> Iterator[ItemOutcome]:
        return iter([_anthropic_outcome(entry) for entry in self.client.messages.batches.results(batch_id)])

    @_typed("anthropic", "anthropic")
    def cancel(self, batch_id: str) -> None:
        self.client.messages.batches.cancel(batch_id)


def _stamp(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _anthropic_outcome(entry: Any) -> ItemOutcome:
    result = entry.result
    if result.type == "succeeded":
        message = result.message
        return ItemOutcome(
            entry.custom_id,
            ProviderResponse(
                text="".join(block.text for block in message.content if block.type == "text"),
                input_tokens=message.usage.input_tokens,
                output_tokens=message.usage.output_tokens,
                model=message.model,
            ),
        )
    if result.type == "errored":
        kind = getattr(result.error.error, "type", "api_error")
        message = getattr(result.error.error, "message", "")
        return ItemOutcome(
            entry.custom_id,
            error=f"anthropic batch: {kind}: {message}"[:2000],
            retryable=kind
            not in ("invalid_request_error", "authentication_error", "permission_error", "not_found_error"),
        )
    return ItemOutcome(
        entry.custom_id,
        error=f"anthropic batch: {result.type}",
        retryable=result.type == "expired",
        cancelled=result.type == "canceled",
    )
