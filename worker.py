"""Start RQ workers for the chunk queue: ``python worker.py [--burst] [--processes N]``."""

from __future__ import annotations

import click

from pipeline.calls.workers import run_pool
from pipeline.logs import setup_logging
from pipeline.settings import load_settings


@click.command()
@click.option("--burst", is_flag=True, help="Drain the queue, then exit.")
@click.option(
    "--processes",
    "-n",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes, supervised: a dead one is respawned and its running chunks requeued at once.",
)
@click.option("--concurrency", type=click.IntRange(1), help="Provider calls in flight per process.")
def main(burst: bool, processes: int, concurrency: int | None) -> None:
    overrides = {"worker_concurrency": concurrency} if concurrency else {}
    settings = load_settings(**overrides)
    setup_logging(settings, "worker")
    run_pool(settings, processes, burst=burst)


if __name__ == "__main__":
    main()
