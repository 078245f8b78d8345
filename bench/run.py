"""End-to-end benchmark: fake provider (own process) -> enqueue -> N worker processes -> collector -> SQL.

    python bench/run.py --scenario limited      # 200 ms latency, 3000 RPM enforced by the server
    python bench/run.py --scenario unlimited    # 200 ms latency, no limit, 128 calls in flight per worker
    python bench/run.py --rows 5000 --latency 0.2 --rpm 3000 --workers 2 --concurrency 128

Uses BENCH_REDIS_URL (default redis://127.0.0.1:6379/13, flushed: never point it at a Redis in use) and a fresh
SQLite file unless DATABASE_URL is set.
Prints rows/s, the fraction of the rate limit and of the in-flight capacity used, 429s, retries, and rows lost
or duplicated, as measured by the SQL tables and the fake server's own counters.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BENCH_REDIS_URL, ROOT, fake_provider_stats, start_fake_provider, write_dataset  # noqa: E402
from pipeline import runs, store  # noqa: E402
from pipeline.queue import connect  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

SCENARIOS = {
    "limited": dict(rows=4000, latency=0.2, rpm=3000, workers=2, concurrency=128),
    "unlimited": dict(rows=12000, latency=0.2, rpm=None, workers=2, concurrency=128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--rows", type=int)
    parser.add_argument("--latency", type=float)
    parser.add_argument("--rpm", type=float)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--chunk-size", type=int, default=1000)
    args = parser.parse_args()
    config = dict(SCENARIOS[args.scenario or "limited"])
    config.update({k: v for k, v in vars(args).items() if v is not None and k in config})
    print(f"benchmark: {json.dumps(config)}, chunk size {args.chunk_size}")

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    server, url = start_fake_provider(config["latency"], config["rpm"])
    redis_url = BENCH_REDIS_URL
    settings = Settings(_env_file=None, data_dir=work, redis_url=redis_url,
                        database_url=os.environ.get("DATABASE_URL", f"sqlite:///{work / 'bench.db'}"),
                        openai_api_key="sk-bench", openai_base_url=f"{url}/v1",
                        worker_concurrency=config["concurrency"], log_level="WARNING", metrics_port=0,
                        chunk_size=args.chunk_size)
    connection = connect(settings)
    connection.flushdb()
    engine = store.make_engine(settings.resolved_database_url)
    env = {**os.environ, "REDIS_URL": settings.redis_url, "DATABASE_URL": settings.resolved_database_url,
           "OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": f"{url}/v1", "LOG_LEVEL": "WARNING", "METRICS_PORT": "0",
           "WORKER_CONCURRENCY": str(config["concurrency"]), "PYTHONPATH": str(ROOT)}
    try:
        dataset = write_dataset(work / "bench.jsonl", config["rows"])
        started = time.monotonic()
        report = runs.submit(connection, settings, runs.RunRequest(
            dataset=dataset, template="Echo: {{ text }}", provider="openai", model="gpt-4o-mini", max_tokens=16,
            id_column="id", rpm=int(config["rpm"]) if config["rpm"] else None, use_cache=False))
        submitted = time.monotonic()
        collector = subprocess.Popen([sys.executable, "enqueue.py", "collect"], cwd=ROOT, env=env)
        workers = subprocess.Popen([sys.executable, "worker.py", "--burst", "--processes", str(config["workers"])],
                                   cwd=ROOT, env=env)
        work_started = time.monotonic()
        while True:
            with engine.connect() as conn:
                row = store.get_run(conn, report.run_id)
            done = (row["rows_succeeded"] + row["rows_failed"]) if row else 0
            if done >= config["rows"] or (workers.poll() is not None and connection.xlen(settings.result_stream) == 0
                                          and done and time.monotonic() - work_started > 5):
                break
            time.sleep(0.2)
        finished = time.monotonic()
        workers.wait(timeout=120)
        collector.terminate()
        collector.wait(timeout=30)
        stats = fake_provider_stats(url)
        report_figures(config, report.run_id, engine, stats, started, submitted, work_started, finished)
    finally:
        server.terminate()
        server.wait(timeout=10)
        connection.flushdb()
        shutil.rmtree(work, ignore_errors=True)


def report_figures(config, run_id, engine, stats, started, submitted, work_started, finished) -> None:
    with engine.connect() as conn:
        run = store.get_run(conn, run_id)
        results = store.count_results(conn, run_id)
    rows = config["rows"]
    elapsed = finished - work_started
    rate = (run["rows_succeeded"]) / elapsed
    paid = stats["paid"]
    duplicated_calls = sum(count - 1 for count in paid.values() if count > 1)
    requests, throttled = stats["requests"], stats["by_status"].get("429", 0)
    print(f"rows                 {rows} ({results.get('succeeded', 0)} succeeded, {results.get('failed', 0)} failed)")
    print(f"submit (validate+enqueue) {submitted - started:.2f} s")
    print(f"end-to-end into SQL  {elapsed:.2f} s from worker start -> {rate:.1f} rows/s")
    if config["rpm"]:
        print(f"rate limit used      {rate / (config['rpm'] / 60):.1%} of {config['rpm']:.0f} RPM")
    capacity = config["workers"] * config["concurrency"] / config["latency"]
    print(f"in-flight capacity   {rate / capacity:.1%} of {capacity:.0f} rows/s "
          f"({config['workers']} x {config['concurrency']} in flight / {config['latency']} s); "
          f"server saw at most {stats['in_flight_max']} in flight")
    steady = (run["rows_succeeded"] - 1) / max(run["last_result_at"] - run["first_result_at"], 1e-9)
    print(f"steady state         {steady:.1f} rows/s between the first and the last answer; "
          f"avg row latency {run['latency_ms_sum'] / max(sum(results.values()), 1):.0f} ms")
    print(f"provider calls       {requests}; 429s {throttled} ({throttled / max(requests, 1):.2%}); "
          f"retries {run['attempts'] - rows}")
    print(f"rows lost            {rows - sum(results.values())}; result rows duplicated 0 (unique key); "
          f"prompts paid twice {duplicated_calls}")


if __name__ == "__main__":
    main()
