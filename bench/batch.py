"""Batch mode beside online mode: the same dataset through both, against the fake provider server.

    python bench/batch.py                       # 10,000 rows, openai gpt-4o-mini, chunks of 1000
    python bench/batch.py --rows 2000 --provider anthropic

Each mode runs the whole pipeline in this process (submit, chunk workers in burst mode, a burst collector, and,
for batch mode, the poll jobs moved to the queue when due, as worker.py's scheduler does) into a fresh SQLite
file, with the fake provider as its own process. Prints, for each mode, the provider calls (online requests,
batch files, batches, batch items), the cost from the runs table and the wall time; the online run is the
reference for the cost. Uses BENCH_REDIS_URL (default redis://127.0.0.1:6379/1), flushed before each mode (so
the batch run does not find the online run's answers in the response cache).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import BENCH_REDIS_URL, fake_provider_stats, reset_fake_provider, start_fake_provider, write_dataset  # noqa: E402
from pipeline.calls import batchstate  # noqa: E402
from pipeline.calls.workers import run_worker  # noqa: E402
from pipeline.collect import store  # noqa: E402
from pipeline.collect.collector import Collector  # noqa: E402
from pipeline.control import runs  # noqa: E402
from pipeline.pricing import NANO  # noqa: E402
from pipeline.queue import SERIALIZER, chunk_queue, connect  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


def move_due_jobs(connection: redis.Redis, settings: Settings) -> None:
    from rq.job import Job

    queue = chunk_queue(connection, settings)
    registry = queue.scheduled_job_registry
    for job in Job.fetch_many(registry.get_jobs_to_schedule(), connection=connection, serializer=SERIALIZER):
        if job is not None:
            registry.remove(job)
            queue.enqueue_job(job)


def run_mode(mode: str, provider: str, url: str, dataset: Path, workdir: Path, chunk_size: int) -> dict:
    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
    reset_fake_provider(url)
    settings = Settings(
        _env_file=None,
        redis_url=BENCH_REDIS_URL,
        database_url=f"sqlite:///{workdir / mode}.db",
        data_dir=workdir,
        log_level="WARNING",
        openai_api_key="sk-bench",
        openai_base_url=f"{url}/v1",
        anthropic_api_key="sk-ant-bench",
        anthropic_base_url=url,
        batch_poll_seconds=1,
        batch_poll_max_seconds=2,
    )
    connection = connect(settings)
    engine = store.make_engine(settings.resolved_database_url)
    started = time.perf_counter()
    report = runs.submit(
        connection,
        settings,
        runs.RunRequest(
            dataset=dataset,
            template="Classify: {{ text }}",
            provider=provider,
            model=MODELS[provider],
            id_column="id",
            chunk_size=chunk_size,
            mode=mode,
        ),
    )
    while True:
        move_due_jobs(connection, settings)
        run_worker(settings, burst=True, with_scheduler=False)
        Collector(settings, connection, engine).run(burst=True)
        with engine.connect() as conn:
            row = store.get_run(conn, report.run_id)
        if row and row["status"] == "completed" and not batchstate.open_batch_count(connection, report.run_id):
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    stats = fake_provider_stats(url)
    online_path = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
    engine.dispose()
    return {
        "mode": mode,
        "rows": row["rows_succeeded"],
        "failed": row["rows_failed"],
        "online_calls": stats["by_path"].get(online_path, 0),
        "batches": stats["batches_created"],
        "batch_items": stats["batch_items"],
        "cost": row["cost_nano"] / NANO,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--provider", choices=sorted(MODELS), default="openai")
    parser.add_argument("--chunk-size", type=int, default=1000, help="rows per chunk = items per batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    process, url = start_fake_provider(0.0)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
            workdir = Path(tmp)
            dataset = write_dataset(workdir / "rows.jsonl", args.rows, width=len(str(args.rows)))
            figures = [
                run_mode(mode, args.provider, url, dataset, workdir, args.chunk_size) for mode in ("online", "batch")
            ]
    finally:
        process.terminate()
        process.wait(timeout=10)
        redis.Redis.from_url(BENCH_REDIS_URL).flushdb()
    print(f"{args.rows} rows, {args.provider} {MODELS[args.provider]}, chunks of {args.chunk_size}, fake provider")
    print(
        f"{'mode':<7} {'rows ok':>8} {'failed':>6} {'online calls':>12} {'batches':>7} {'batch items':>11} "
        f"{'cost USD':>10} {'seconds':>8}"
    )
    for f in figures:
        print(
            f"{f['mode']:<7} {f['rows']:>8} {f['failed']:>6} {f['online_calls']:>12} {f['batches']:>7} "
            f"{f['batch_items']:>11} {f['cost']:>10.6f} {f['seconds']:>8.1f}"
        )
    online, batch = figures
    print(f"batch cost / online cost (the reference, same run): {batch['cost'] / online['cost']:.4f}")


if __name__ == "__main__":
    main()
