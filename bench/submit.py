"""Submit benchmark: a large generated dataset through `enqueue.py submit`, measuring time and peak memory.

    python bench/submit.py                      # 1,000,000 rows of CSV, chunk size 1000
    python bench/submit.py --rows 200000 --format parquet

The submit reads the file twice (a validating pass, then the enqueue pass), streaming both: its peak memory
must stay nearly flat as the file grows (8 bytes an id for the duplicate check), well below the file's size.
Uses BENCH_REDIS_URL (default redis://127.0.0.1:6379/1, flushed before and after: never a Redis in use).
Prints rows/s and the submitting process's peak RSS next to the file size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import run_with_peak_rss  # noqa: E402

REVIEW = 'The strap broke after a week, but support replaced it quickly, which was nice, "honestly".'


def write_dataset(path: Path, rows: int, fmt: str) -> Path:
    batch = 100_000
    if fmt == "parquet":
        with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("review", pa.string())])) as writer:
            for start in range(0, rows, batch):
                ids = [f"r{i:08d}" for i in range(start, min(rows, start + batch))]
                writer.write_table(pa.table({"id": ids, "review": [f"{REVIEW} #{i}" for i in ids]}))
        return path
    with path.open("w", encoding="utf-8") as handle:
        if fmt == "csv":
            handle.write("id,review\n")
        for i in range(rows):
            if fmt == "csv":
                handle.write(f'r{i:08d},"{REVIEW.replace(chr(34), chr(34) * 2)} #{i}"\n')
            else:
                handle.write(json.dumps({"id": f"r{i:08d}", "review": f"{REVIEW} #{i}"}) + "\n")
    return path


def run_measured(args: list[str], env: dict[str, str]) -> tuple[float, int, tuple[str, str]]:
    """Run a Python command; return its peak RSS in MB (VmHWM, sampled until it exits), exit code and output."""
    peak_mb, code, stdout, stderr = run_with_peak_rss(args, env, interval=0.05)
    return peak_mb, code, (stdout, stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    parser.add_argument("--chunk-size", type=int, default=1000)
    args = parser.parse_args()

    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    work = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    dataset = write_dataset(work / f"big.{args.format}", args.rows, args.format)
    env = {**os.environ, "REDIS_URL": redis_url, "DATA_DIR": str(work), "LOG_LEVEL": "WARNING"}
    baseline_mb, _, _ = run_measured(["enqueue.py", "--help"], env)  # the CLI with its libraries loaded
    started = time.monotonic()
    peak_mb, returncode, (stdout, stderr) = run_measured(
        [
            "enqueue.py",
            "submit",
            str(dataset),
            "--template",
            "Classify: {{ review }}",
            "--id-column",
            "id",
            "--chunk-size",
            str(args.chunk_size),
            "--json",
        ],
        env,
    )
    elapsed = time.monotonic() - started
    try:
        if returncode != 0:
            sys.exit(f"submit failed: {stderr.strip()}")
        report = json.loads(stdout)
        size_mb = dataset.stat().st_size / 1e6
        print(f"dataset          {args.rows} rows of {args.format}, {size_mb:.0f} MB")
        print(
            f"submit           {elapsed:.1f} s -> {args.rows / elapsed:,.0f} rows/s "
            f"(validating pass + enqueue pass), {report['jobs_enqueued']} jobs enqueued"
        )
        print(
            f"peak memory      {peak_mb:.0f} MB RSS for the submitting process: {peak_mb - baseline_mb:.0f} MB "
            f"above the {baseline_mb:.0f} MB of the idle CLI, for a {size_mb:.0f} MB file"
        )
        print(f"redis            {client.info('memory')['used_memory_human']} used by the queued chunks")
    finally:
        client.flushdb()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
