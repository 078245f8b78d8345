"""Runs: submit (validate, then enqueue), find, cancel, resume, retry failed rows, and report status.

Run state that workers need lives in Redis (config, done rows, cancel flag, spend); the collector copies it
into SQL. A run id is derived from the dataset's hash and everything that defines the run, so submitting
the same thing twice finds the same run; ``--idempotency-key`` pins the id to a key (e.g. a nightly date).
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from rq.job import Job, JobStatus
from sqlalchemy import Engine

from pipeline import handoff
from pipeline.calls import batchstate
from pipeline.calls.budget import spend_key
from pipeline.collect import store
from pipeline.control.rebuild import known_config, recorded_submit
from pipeline.control.runlock import RequeueClaim
from pipeline.control.runstate import (
    CANCELLED,
    SUBMITTED,
    cancelled_key,
    config_key,
    generation_key,
    idempotency_key,
    load_config,
    save_config,
    submitted_key,
)
from pipeline.errors import ConfigError, DatasetError, RunNotFound
from pipeline.intake.estimate import Estimate, estimate
from pipeline.intake.progress import ENQUEUEING, ROWS, ProgressCallback, stage_reporter
from pipeline.intake.templates import PromptTemplate
from pipeline.pricing import NANO, PriceTable
from pipeline.providers import check_provider_config
from pipeline.queue import (
    SERIALIZER,
    chunk_label,
    chunk_queue,
    consuming_workers,
    decoded,
    enqueue_chunks,
    enqueued_key,
    job_id,
)
from pipeline.records import ModelTarget, Row, RowsJSON, RunConfig, stable_hash
from pipeline.settings import Settings

# pipeline.intake.datasets (pandas and pyarrow: about a second of CPU to import) is imported by the
# functions that read a file, so that the commands that do not (collect, status, wait) start without it.

# A Redis transaction of chunk jobs holds at most this many jobs and rows (the submitter's memory, and how long
# one MULTI/EXEC holds Redis up for everyone else).
ENQUEUE_BATCH_JOBS, ENQUEUE_BATCH_ROWS = 200, 10_000
RETRY_EVENT_KEYS = 1000  # row keys per "retrying" event
PENDING_JOB_STATES = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED}

# Provider parameters a run may not set through --param: the pipeline builds them (or, like stream and n, they
# would return answers it cannot read or several answers billed for one row).
RESERVED_PARAMS = frozenset(
    {"model", "messages", "system", "stream", "stream_options", "n", "prompt", "response_format"}
)


def model_for(provider: str, model: str | None, field: str = "model") -> str:
    """The run's model: as given, or ``fake`` for the offline fake provider; every other provider needs one
    (``field`` names where the front end takes it)."""
    if model is not None:
        return model
    if provider != "fake":
        raise ConfigError(f"{field} is required for provider {provider}")
    return "fake"


@dataclass
class RunRequest:
    """What a user asks for; ``submit`` turns it into a RunConfig after validating the dataset."""

    dataset: Path
    template: str
    provider: str = "fake"
    model: str = "fake"
    system_prompt: str | None = None
    temperature: float | None = None
    max_tokens: int = 256
    params: dict[str, Any] = field(default_factory=dict)
    json_schema: dict[str, Any] | None = None
    fallbacks: list[str] = field(default_factory=list)
    id_column: str | None = None
    chunk_size: int | None = None
    max_cost: float | None = None
    price_in: float | None = None
    price_out: float | None = None
    use_cache: bool = True
    rpm: int | None = None
    tpm: int | None = None
    name: str | None = None
    idempotency_key: str | None = None
    owner: str | None = None  # a web user's name: the run is theirs alone (its id and idempotency key too)
    mode: str = "online"  # or "batch": the provider's batch API at half the price (openai, anthropic)


@dataclass
class SubmitReport:
    run_id: str
    rows: int
    chunks: int
    jobs_enqueued: int
    existing: bool
    unpriced: list[str] = field(default_factory=list)  # models of the run without a price: its cost is unknown


class ChunkSpool:
    """The validating pass's serialized chunks, kept in a temporary file until the enqueue reads them back:
    every row is read and serialized once, and the submitter's memory stays flat however large the file."""

    _HEADER = struct.Struct("<IQ")  # rows, bytes

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="pipeline-submit-")  # noqa: SIM115  (closed by close())
        self.chunks = 0

    def write(self, rows: RowsJSON) -> None:
        data = rows.text.encode("ascii")
        self._file.write(self._HEADER.pack(rows.count, len(data)) + data)
        self.chunks += 1

    def read(self) -> Iterator[RowsJSON]:
        self._file.seek(0)
        for _ in range(self.chunks):
            count, size = self._HEADER.unpack(self._file.read(self._HEADER.size))
            yield RowsJSON(count, self._file.read(size).decode("ascii"))

    def close(self) -> None:
        self._file.close()


def submit(
    connection: redis.Redis,
    settings: Settings,
    request: RunRequest,
    progress: ProgressCallback | None = None,
    engine: Engine | None = None,
) -> SubmitReport:
    """Validate everything, then enqueue. Any error is raised before the first job is enqueued.

    ``progress`` hears each stage with its total: the file's bytes read, then hashed, then the rows enqueued.

    Submitting again what an earlier submit started (same content, or same idempotency key) enqueues only
    what that submit did not get to, e.g. because it was killed half-way; usually nothing. With ``engine``, a run
    that Redis lost but SQL has is rebuilt from SQL first: no row with a result there is asked again.
    """
    if request.idempotency_key:
        known = connection.get(idempotency_key(request.idempotency_key, request.owner))
        if known is not None:
            config = load_config(connection, decoded(known))
            finished = connection.exists(submitted_key(config.run_id))
            return _finish_enqueue(
                connection, settings, config, None if finished else _unchanged_dataset(config), existing=True
            )
    spool = ChunkSpool()
    try:
        config = validate(settings, request, progress, spool=spool)
        unpriced = unpriced_models(settings, config)
        dataset = Path(config.dataset)  # this path was just read: the run may know the same content by another
        if engine is not None and not connection.exists(config_key(config.run_id)):
            recorded_submit(connection, engine, config.run_id)
        existing = not connection.set(config_key(config.run_id), json.dumps(config.to_dict()), nx=True)
        if existing:
            config = load_config(connection, config.run_id)
        else:
            handoff.publish_event(connection, settings.result_stream, handoff.RUN, config.to_dict())
        if request.idempotency_key:
            connection.set(idempotency_key(request.idempotency_key, request.owner), config.run_id, nx=True)
        report = _finish_enqueue(connection, settings, config, dataset, existing, spool, progress)
    finally:
        spool.close()
    report.unpriced = unpriced
    return report


def dry_run(
    connection: redis.Redis, settings: Settings, request: RunRequest, progress: ProgressCallback | None = None
) -> Estimate:
    """Validate everything ``submit`` validates and price the run; nothing is enqueued or stored."""
    return estimate(connection, settings, validate(settings, request, progress))


def _finish_enqueue(
    connection: redis.Redis,
    settings: Settings,
    config: RunConfig,
    dataset: Path | None,
    existing: bool,
    spool: ChunkSpool | None = None,
    progress: ProgressCallback | None = None,
) -> SubmitReport:
    from pipeline.intake.datasets import serialized_chunks

    enqueued = 0
    report = stage_reporter(progress, ENQUEUEING, config.total_rows, ROWS)
    if not connection.exists(submitted_key(config.run_id)):
        if dataset is None:
            raise DatasetError(
                f"{config.dataset}: gone or changed, and run {config.run_id} was not fully "
                "enqueued; restore the file or submit it as a new run"
            )
        if report is not None:
            report(0)
        rows = spool.read() if spool is not None else serialized_chunks(dataset, config.chunk_size, config.id_column)
        chunks = ((chunk_label(n), chunk) for n, chunk in enumerate(rows))
        enqueued = _enqueue_in_batches(connection, settings, config.run_id, chunks, progress=report)
        connection.set(submitted_key(config.run_id), "1")
    if report is not None:
        report(config.total_rows)
    return SubmitReport(config.run_id, config.total_rows, config.total_chunks, enqueued, existing)


def _unchanged_dataset(config: RunConfig) -> Path | None:
    from pipeline.intake.datasets import file_sha256

    path = Path(config.dataset)
    if not path.is_file() or file_sha256(path) != config.dataset_hash:
        return None
    return path


def validate(
    settings: Settings, request: RunRequest, progress: ProgressCallback | None = None, spool: ChunkSpool | None = None
) -> RunConfig:
    """Check provider, template, schema and every row of the dataset; return the run's configuration."""
    from pipeline.intake.datasets import check_path, scan

    _check_fields(request)
    _check_mode(request)
    _check_prices(settings, request)
    for target in [f"{request.provider}:{request.model}", *request.fallbacks]:
        provider, _, model = target.partition(":")
        check_provider_config(provider, settings)
        if not model:
            raise ConfigError(f"fallback {target!r} needs a model: PROVIDER:MODEL")
    template = PromptTemplate(request.template)
    _check_schema(request.json_schema)
    path = check_path(request.dataset, settings.allowed_data_dir)
    chunk_size = request.chunk_size or settings.chunk_size
    if request.mode == "batch" and settings.redis_url is None:
        raise ConfigError(
            "--mode batch needs a Redis server (REDIS_URL): its poll jobs wait in RQ's scheduler, "
            "which workers run only on a Redis server, not the embedded one"
        )
    if request.mode == "batch" and chunk_size > BATCH_REQUEST_LIMITS[request.provider]:
        raise ConfigError(
            f"--chunk-size {chunk_size}: a {request.provider} batch holds at most "
            f"{BATCH_REQUEST_LIMITS[request.provider]:,} requests, and each chunk is one batch"
        )
    summary = scan(
        path,
        id_column=request.id_column,
        max_row_bytes=settings.max_row_bytes,
        template=template,
        progress=progress,
        chunk_size=chunk_size,
        on_chunk=spool.write if spool is not None else None,
    )
    config = RunConfig(
        run_id="",
        dataset=str(path),
        dataset_hash=summary.sha256,
        template=request.template,
        provider=request.provider,
        model=request.model,
        system_prompt=request.system_prompt,
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        params=dict(request.params),
        json_schema=request.json_schema,
        fallbacks=list(request.fallbacks),
        id_column=request.id_column,
        chunk_size=chunk_size,
        total_rows=summary.rows,
        total_chunks=-(-summary.rows // chunk_size),
        max_cost=request.max_cost,
        price_in=request.price_in,
        price_out=request.price_out,
        use_cache=request.use_cache,
        rpm=request.rpm,
        tpm=request.tpm,
        name=request.name,
        idempotency_key=request.idempotency_key,
        created_at=time.time(),
        owner=request.owner,
        mode=request.mode,
    )
    identity = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("run_id", "created_at", "dataset")
        and not (k in ("price_in", "price_out", "owner") and v is None)  # ids of runs before these options
        and not (k == "mode" and v == "online")
    }
    config.run_id = "r" + stable_hash(identity)[:15]
    return config


def unpriced_models(settings: Settings, config: RunConfig) -> list[str]:
    """The run's models (fallbacks included) that have no price here: the built-in table, PRICE_FILE, or the
    run's own ``--price-in/--price-out`` for its model."""
    prices = PriceTable.load(settings.price_file).with_price(config.model, config.price_in, config.price_out)
    return prices.unpriced([target.model for target in config.targets])


def _check_prices(settings: Settings, request: RunRequest) -> None:
    """A budget needs a price for every model that may answer: without one, every call would look free."""
    if (request.price_in is None) != (request.price_out is None):
        raise ConfigError("give both --price-in and --price-out (USD per million input / output tokens)")
    if request.max_cost is None:
        return
    prices = PriceTable.load(settings.price_file).with_price(request.model, request.price_in, request.price_out)
    unpriced = prices.unpriced([request.model] + [ModelTarget.parse(f).model for f in request.fallbacks])
    if unpriced:
        raise ConfigError(
            f"--max-cost needs a price, and there is none for {', '.join(unpriced)}: add it to "
            "PRICE_FILE, or give --price-in/--price-out (USD per million tokens) for --model"
        )


def _check_fields(request: RunRequest) -> None:
    """The CLI's option types check these; a runs file or a library caller reaches here unchecked."""

    def number(name: str, value: Any, *, integer: bool, minimum: float | None) -> None:
        kinds = (int,) if integer else (int, float)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, kinds) or (minimum is not None and value < minimum):
            kind = "an integer" if integer else "a number"
            raise ConfigError(
                f"{name} must be {kind}" + (f" >= {minimum:g}" if minimum is not None else "") + f", got {value!r}"
            )

    number("max_tokens", request.max_tokens, integer=True, minimum=1)
    number("chunk_size", request.chunk_size, integer=True, minimum=1)
    number("rpm", request.rpm, integer=True, minimum=1)
    number("tpm", request.tpm, integer=True, minimum=1)
    number("max_cost", request.max_cost, integer=False, minimum=0)
    number("price_in", request.price_in, integer=False, minimum=0)
    number("price_out", request.price_out, integer=False, minimum=0)
    number("temperature", request.temperature, integer=False, minimum=None)
    for name, value, limit in (
        ("model", request.model, 200),
        ("name", request.name, 200),
        ("idempotency_key", request.idempotency_key, 200),
    ):
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise ConfigError(f"{name} must be text of at most {limit} characters")
    if not isinstance(request.params, dict):
        raise ConfigError("params must be a table of provider parameters")
    reserved = sorted(RESERVED_PARAMS & set(request.params))
    if reserved:
        raise ConfigError(
            f"param {reserved[0]!r} cannot be set: the pipeline sets it (reserved: "
            f"{', '.join(sorted(RESERVED_PARAMS))})"
        )
    if not isinstance(request.fallbacks, (list, tuple)) or not all(isinstance(f, str) for f in request.fallbacks):
        raise ConfigError("fallbacks must be a list of PROVIDER:MODEL")


BATCH_MODE_PROVIDERS = ("openai", "anthropic")
BATCH_REQUEST_LIMITS = {"openai": 50_000, "anthropic": 100_000}  # as pipeline.providers.batches.LIMITS


def _check_mode(request: RunRequest) -> None:
    if request.mode not in ("online", "batch"):
        raise ConfigError(f"mode must be online or batch, got {request.mode!r}")
    if request.mode != "batch":
        return
    if request.provider not in BATCH_MODE_PROVIDERS:
        raise ConfigError(
            f"--mode batch needs a provider with a batch API ({', '.join(BATCH_MODE_PROVIDERS)}); "
            f"{request.provider} has none"
        )
    if request.fallbacks:
        raise ConfigError("--fallback cannot be used with --mode batch (a batch has one model)")


def _check_schema(schema: dict[str, Any] | None) -> None:
    if schema is None:
        return
    import jsonschema

    if not isinstance(schema, dict):
        raise ConfigError(f"invalid JSON schema: expected a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"invalid JSON schema: {exc.message}") from None


def _enqueue_in_batches(
    connection: redis.Redis,
    settings: Settings,
    run_id: str,
    chunks: Iterable[tuple[str, list[Row] | RowsJSON]],
    keep_alive: Callable[[], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Enqueue in transactions of a bounded size; ``progress`` hears the rows enqueued (or found enqueued)."""
    queue = chunk_queue(connection, settings)
    total, batch, rows, passed = 0, [], 0, 0
    for chunk in chunks:
        batch.append(chunk)
        rows += len(chunk[1])
        if rows >= ENQUEUE_BATCH_ROWS or len(batch) >= ENQUEUE_BATCH_JOBS:
            total += enqueue_chunks(queue, settings, run_id, batch)
            passed += rows
            batch, rows = [], 0
            if keep_alive is not None:
                keep_alive()
            if progress is not None:
                progress(passed)
    total += enqueue_chunks(queue, settings, run_id, batch)
    if progress is not None:
        progress(passed + rows)
    return total


def cancel(connection: redis.Redis, settings: Settings, run_id: str) -> int:
    """Stop a run: queued chunks are cancelled, running ones stop before their next row. Returns jobs cancelled."""
    load_config(connection, run_id)
    connection.set(cancelled_key(run_id), "1")
    cancelled = 0
    for job in _run_jobs(connection, run_id):
        if job.get_status(refresh=False) in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            job.cancel()
            cancelled += 1
    handoff.publish_event(connection, settings.result_stream, handoff.STATUS, {"run_id": run_id, "status": CANCELLED})
    if connection.exists(batchstate.run_slots_key(run_id)):  # batch mode: its poll jobs cancel the batches now
        from pipeline.calls.batches import wake_polls

        wake_polls(connection, settings, run_id)
    return cancelled


def _run_jobs(connection: redis.Redis, run_id: str) -> Iterator[Job]:
    labels = sorted(map(decoded, connection.smembers(enqueued_key(run_id))))
    ids = [job_id(run_id, label) for label in labels]
    for start in range(0, len(ids), 500):
        for job in Job.fetch_many(ids[start : start + 500], connection=connection, serializer=SERIALIZER):
            if job is not None:
                yield job


def resume(
    connection: redis.Redis,
    settings: Settings,
    run_id: str,
    *,
    max_cost: float | None = None,
    engine: Engine | None = None,
) -> int:
    """Re-enqueue every row that has no result yet (after a cancel, a crash or a spent budget).

    Reads the dataset again (its hash must not have changed). Refused while any of the run's jobs is queued or
    running, or while another resume / retry-failed of the run is enqueueing, so that no row is ever requested by
    two jobs at once. A run whose Redis state is gone (lost, or expired after the run ended) is rebuilt from
    SQL first (``engine`` needed): rows with a result there are not asked again. Returns the jobs enqueued.
    """
    from pipeline.intake.datasets import file_sha256

    with RequeueClaim(connection, run_id, "resume") as claim:
        config = known_config(connection, engine, run_id)
        path = Path(config.dataset)
        if not path.exists():
            raise DatasetError(f"{path}: the run's dataset is gone; resume needs it")
        if file_sha256(path) != config.dataset_hash:
            raise DatasetError(f"{path}: changed since the run was submitted; submit it as a new run")
        _refuse_if_busy(connection, run_id)
        return _resume_claimed(connection, settings, config, path, claim, max_cost=max_cost, engine=engine)


def _resume_claimed(
    connection: redis.Redis,
    settings: Settings,
    config: RunConfig,
    path: Path,
    claim: RequeueClaim,
    *,
    max_cost: float | None,
    engine: Engine | None,
) -> int:
    from pipeline.intake.datasets import iter_chunks

    run_id = config.run_id
    if max_cost is not None:
        if unpriced := unpriced_models(settings, config):
            raise ConfigError(
                f"--max-cost needs a price, and there is none for {', '.join(unpriced)}: add it to PRICE_FILE"
            )
        if config.max_cost is None and engine is not None:  # spend was not tracked without a cap: start from SQL
            with engine.connect() as conn:
                row = store.get_run(conn, run_id)
            connection.set(spend_key(run_id), row["cost_nano"] if row else 0)  # exact: both are nano-dollars
        config.max_cost = max_cost
        save_config(connection, config)
    connection.delete(cancelled_key(run_id))
    handoff.publish_event(
        connection,
        settings.result_stream,
        handoff.STATUS,
        {"run_id": run_id, "status": "running", "config": config.to_dict()},
    )
    done = handoff.done_key(run_id)
    generation = int(connection.incr(generation_key(run_id)))
    chunks = []
    for n, rows in enumerate(iter_chunks(path, config.chunk_size, config.id_column)):
        status = connection.hmget(done, [r.key for r in rows])
        todo = [row for row, s in zip(rows, status) if not handoff.is_done(s)]
        if todo:
            chunks.append((chunk_label(n, generation), todo))
        if n % 100 == 0:
            claim.renew()
    enqueued = _enqueue_in_batches(connection, settings, run_id, chunks, claim.renew)
    connection.set(submitted_key(run_id), "1")  # every row is covered now: a repeated submit adds nothing
    return enqueued


def retry_failed(connection: redis.Redis, settings: Settings, engine: Engine, run_id: str) -> int:
    """Send only the failed rows again (inputs come from the results table). Returns jobs enqueued.

    The collector is told which rows are being retried, so the run is not complete until they are answered.
    """
    with RequeueClaim(connection, run_id, "retry-failed") as claim:
        config = known_config(connection, engine, run_id)
        _refuse_if_busy(connection, run_id)
        return _retry_claimed(connection, settings, engine, config, claim)


def _retry_claimed(
    connection: redis.Redis, settings: Settings, engine: Engine, config: RunConfig, claim: RequeueClaim
) -> int:
    run_id = config.run_id
    with engine.connect() as conn:
        failed = [
            Row(key=key, index=index, values=values) for key, index, values in store.unfinished_rows(conn, run_id)
        ]
    if not failed:
        return 0
    connection.delete(cancelled_key(run_id))
    # The rows' new results carry this generation: the collector reopens only results of an older one ("at",
    # this host's clock, is for collectors of an older version; clocks of different hosts order nothing).
    generation = int(connection.incr(generation_key(run_id)))
    keys, at = [r.key for r in failed], time.time()
    for start in range(0, len(keys), RETRY_EVENT_KEYS):
        connection.hdel(handoff.done_key(run_id), *keys[start : start + RETRY_EVENT_KEYS])
        handoff.publish_event(
            connection,
            settings.result_stream,
            handoff.STATUS,
            {
                "run_id": run_id,
                "status": "running",
                "at": at,
                "generation": generation,
                "retrying": keys[start : start + RETRY_EVENT_KEYS],
            },
        )
    size = config.chunk_size
    chunks = [(chunk_label(n, generation), failed[i : i + size]) for n, i in enumerate(range(0, len(failed), size))]
    return _enqueue_in_batches(connection, settings, run_id, chunks, claim.renew)


def _refuse_if_busy(connection: redis.Redis, run_id: str) -> None:
    """No row may be asked for by two jobs at once: resume and retry-failed wait for the run's jobs."""
    busy = [job.id for job in _run_jobs(connection, run_id) if job.get_status(refresh=False) in PENDING_JOB_STATES]
    if busy:
        raise ConfigError(f"run {run_id} still has {len(busy)} chunk job(s) queued or running; wait or cancel first")
    open_batches = batchstate.open_batch_count(connection, run_id)
    if open_batches:
        raise ConfigError(
            f"run {run_id} still has {open_batches} provider batch(es) open; wait for them to end "
            "(a cancel ends them) first"
        )


def cost_usd(run: dict[str, Any]) -> float | None:
    """A run's cost in dollars, or None (unknown) once a result came from a model without a price."""
    return None if run["rows_unpriced"] else run["cost_nano"] / NANO


def run_status(connection: redis.Redis, engine: Engine, run_id: str, queue_name: str | None = None) -> dict[str, Any]:
    """The run's totals from SQL, plus what is still on its way (answered but not yet written) from Redis.

    With ``queue_name``, also the live workers on that queue (``workers``) and, when rows wait for a worker and
    none is there, a note saying so: otherwise such a run shows ``submitted`` forever with nothing happening.
    """
    with engine.connect() as conn:
        row = store.get_run(conn, run_id)
    note = None
    try:
        config = load_config(connection, run_id)
    except RunNotFound:
        if row is None or row["dataset_hash"] == store.UNREGISTERED:
            raise
        config = RunConfig.from_dict(row["config"])
        if row["status"] not in store.FINAL_STATUSES:  # a final run's keys expire on purpose; this one's were lost
            note = (
                f"the run's queue state in Redis is gone (Redis lost its data), so nothing is working on it: "
                f"run `resume {run_id}` to finish it; rows with a result in SQL are not asked again"
            )
    total = config.total_rows
    handed_over = int(connection.hlen(handoff.done_key(run_id)))
    if row is None:
        row = {
            "status": SUBMITTED,
            "rows_succeeded": 0,
            "rows_failed": 0,
            "rows_cached": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_nano": 0,
            "rows_unpriced": 0,
            "attempts": 0,
            "timeouts": 0,
            "rate_limited": 0,
            "latency_ms_sum": 0.0,
            "created_at": config.created_at,
            "first_result_at": None,
            "last_result_at": None,
            "finished_at": None,
        }
    written = row["rows_succeeded"] + row["rows_failed"]
    end = row["finished_at"] or (time.time() if row["status"] not in store.FINAL_STATUSES else row["last_result_at"])
    status = row["status"]
    if connection.exists(cancelled_key(run_id)) and status not in store.FINAL_STATUSES:
        status = CANCELLED
    workers = None
    if queue_name is not None and status not in store.FINAL_STATUSES and status != CANCELLED:
        workers = consuming_workers(connection, queue_name)
        if workers == 0 and total > max(handed_over, written):  # rows no worker has answered yet
            idle = f"no worker is consuming queue {queue_name}: the run's chunks wait there until a worker starts"
            note = idle if note is None else f"{note}; {idle}"
    return {
        "run_id": run_id,
        "name": config.name,
        "status": status,
        "dataset": config.dataset,
        "provider": config.provider,
        "model": config.model,
        "rows_total": total,
        "rows_succeeded": row["rows_succeeded"],
        "rows_failed": row["rows_failed"],
        "rows_pending": max(0, total - written),
        "rows_in_handoff": max(0, handed_over - written),
        "rows_cached": row["rows_cached"],
        "attempts": row["attempts"],
        "timeouts": row["timeouts"],
        "rate_limited": row["rate_limited"],
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "cost_usd": cost_usd(row),
        "rows_unpriced": row["rows_unpriced"],
        "avg_latency_ms": round(row["latency_ms_sum"] / written, 1) if written else None,
        "elapsed_s": round((end or time.time()) - row["created_at"], 2),
        "max_cost": config.max_cost,
        "workers": workers,
        "note": note,
        "owner": config.owner,
        "mode": config.mode,
        "batches": batchstate.states(connection, run_id) if config.mode == "batch" else {},
    }
