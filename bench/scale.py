"""Scale benchmarks (issue 11): submit and export, each beside a raw library reference measured in the same run.

    python bench/scale.py submit [--sizes 100000,1000000,3000000] [--formats csv,jsonl,parquet]
    python bench/scale.py export [--rows 1000000] [--database sqlite|postgresql|both]

submit: for each format and size, a generated dataset is read by the raw reference (the library's chunked
reader, one ``json.dumps`` per row: pandas for CSV and JSONL, pyarrow for Parquet) and then submitted
(``runs.submit``: validate every row, then enqueue every chunk into Redis), each in its own process, timed
inside it (interpreter start-up left out of both) with its peak RSS (VmHWM) sampled from outside.

export: a results table of ``--rows`` rows is filled directly with SQLAlchemy (one bulk INSERT per 50,000 rows,
not through the collector), then each format is exported by ``export_run`` beside a raw reference (the same
rows streamed from the same query straight into csv.writer / json.dumps / a pyarrow ParquetWriter).

Uses BENCH_REDIS_URL (default redis://127.0.0.1:6379/13, flushed: never a Redis in use).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
PG_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEMPLATE = "Classify: {{ review }}"


# ---------------------------------------------------------------- measuring a child process

def measured(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run ``python bench/scale.py ARGS`` (a child that prints one JSON line); return it and its peak RSS in MB."""
    process = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=env or dict(os.environ),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output: list[tuple[str, str]] = []
    reader = threading.Thread(target=lambda: output.append(process.communicate()))
    reader.start()
    peak_kb = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(0.02)
    reader.join()
    stdout, stderr = output[0]
    if process.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed: {stderr.strip()[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), peak_kb / 1024


# ---------------------------------------------------------------- submit

def raw_read(path: Path) -> dict[str, Any]:
    """The reference: the library's chunked reader and one JSON serialization per row, nothing else."""
    import pandas as pd
    import pyarrow.parquet as pq

    started, rows = time.perf_counter(), 0
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
            for record in batch.to_pylist():
                json.dumps(record)
                rows += 1
    else:
        reader = (pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=10_000) if path.suffix == ".csv"
                  else pd.read_json(path, lines=True, dtype=False, chunksize=10_000))
        for frame in reader:
            for record in frame.to_dict(orient="records"):
                json.dumps(record)
                rows += 1
    return {"rows": rows, "seconds": time.perf_counter() - started}


def pipeline_submit(path: Path, chunk_size: int) -> dict[str, Any]:
    """``runs.submit`` as the CLI calls it (validating pass, then every chunk enqueued), timed in-process."""
    from pipeline import runs
    from pipeline.queue import connect
    from pipeline.settings import Settings

    settings = Settings(_env_file=None, redis_url=REDIS_URL, data_dir=path.parent, log_level="WARNING")
    connection = connect(settings)
    request = runs.RunRequest(dataset=path, template=TEMPLATE, id_column="id", chunk_size=chunk_size)
    started = time.perf_counter()
    report = runs.submit(connection, settings, request)
    return {"rows": report.rows, "jobs": report.jobs_enqueued, "seconds": time.perf_counter() - started}


def bench_submit(sizes: list[int], formats: list[str], chunk_size: int) -> None:
    import redis

    sys.path.insert(0, str(ROOT / "bench"))
    from submit import write_dataset

    client = redis.Redis.from_url(REDIS_URL)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"submit: chunk size {chunk_size}, template {TEMPLATE!r}, --id-column id; time in-process, "
          "peak RSS of each process (VmHWM)")
    print(f"{'format':8} {'rows':>9} {'MB':>5} | {'reference rows/s':>16} {'us/row':>6} {'RSS MB':>6} | "
          f"{'submit rows/s':>13} {'us/row':>6} {'RSS MB':>6} | ratio | redis")
    try:
        for fmt in formats:
            for rows in sizes:
                client.flushdb()
                dataset = write_dataset(work / f"data-{rows}.{fmt}", rows, fmt)
                reference, reference_mb = measured(["_raw", str(dataset)])
                submitted, submit_mb = measured(["_submit", str(dataset), str(chunk_size)])
                assert reference["rows"] == submitted["rows"] == rows, (reference, submitted)
                ref_rate, rate = rows / reference["seconds"], rows / submitted["seconds"]
                print(f"{fmt:8} {rows:>9,} {dataset.stat().st_size / 1e6:>5.0f} | {ref_rate:>16,.0f} "
                      f"{1e6 / ref_rate:>6.2f} {reference_mb:>6.0f} | {rate:>13,.0f} {1e6 / rate:>6.2f} "
                      f"{submit_mb:>6.0f} | {rate / ref_rate:>5.2f} | {client.info('memory')['used_memory_human']}",
                      flush=True)
                dataset.unlink()
    finally:
        client.flushdb()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # a measured child
        command, *rest = sys.argv[1:]
        if command == "_raw":
            print(json.dumps(raw_read(Path(rest[0]))))
        elif command == "_submit":
            print(json.dumps(pipeline_submit(Path(rest[0]), int(rest[1]))))
        elif command in ("_export", "_export_raw"):
            print(json.dumps(export_child(command, *rest)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    submit = sub.add_parser("submit")
    submit.add_argument("--sizes", default="100000,1000000,3000000")
    submit.add_argument("--formats", default="csv,jsonl,parquet")
    submit.add_argument("--chunk-size", type=int, default=1000)
    export = sub.add_parser("export")
    export.add_argument("--sizes", default="100000,1000000,3000000")
    export.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="sqlite")
    export.add_argument("--formats", default="csv,jsonl,parquet")
    args = parser.parse_args()
    if args.bench == "submit":
        bench_submit([int(s) for s in args.sizes.split(",")], args.formats.split(","), args.chunk_size)
    else:
        bench_export([int(s) for s in args.sizes.split(",")], args.database, args.formats.split(","))


def export_child(command: str, *args: str) -> dict[str, Any]:
    raise NotImplementedError


def bench_export(sizes: list[int], database: str, formats: list[str]) -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
