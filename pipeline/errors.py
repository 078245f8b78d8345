"""The pipeline's exceptions: one rooted hierarchy, retryable and permanent provider failures kept apart."""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """Settings or run options are missing or contradictory (e.g. no API key for the chosen provider)."""


class DatasetError(PipelineError):
    """The input file cannot be used; the message names the file and the line, row or column."""


class TemplateError(PipelineError):
    """The prompt template is invalid or needs a column the dataset lacks."""


class RunNotFound(PipelineError):
    """No run has the given id."""


class RowInterrupted(PipelineError):
    """A row stopped before its answer. ``billed`` is its ``stopped`` result when answers were already billed
    for it (rejected by the JSON schema, a primary's before a fallback, a call that timed out), so that what
    was paid reaches SQL; None when nothing was."""

    billed: object | None = None


class BudgetExceeded(RowInterrupted):
    """The run's ``--max-cost`` would be exceeded by the next call; the row is left for ``resume``."""


class RunCancelled(RowInterrupted):
    """The run was cancelled; remaining rows are left unanswered."""


class ProviderError(PipelineError):
    """A provider call failed. ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(ProviderError):
    """A transient failure: the same request may succeed later."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """HTTP 429: the provider asks us to slow down, often with ``Retry-After``."""


class ServerError(RetryableError):
    """HTTP 5xx, a connection failure or an unreadable response body."""


class ProviderTimeout(RetryableError):
    """No answer in time. The provider may still bill it, so these retries are bounded separately."""


class PermanentError(ProviderError):
    """A failure that will repeat on retry (400/401/403/404/422, invalid answer after all tries)."""


class UnreadableAnswer(PermanentError):
    """A 2xx answer that cannot be read (not JSON, no choices, a stream). The provider has likely billed it, so
    it is not asked again, and its estimated cost is counted once."""


class InvalidAnswer(PermanentError):
    """The answer failed JSON-schema validation (retried a bounded number of times before it is final)."""
