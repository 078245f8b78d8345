"""Scale benchmarks (issue 11): submit and export, each beside a raw library reference measured in the same run.

    python bench/scale.py submit [--sizes 100000,1000000,3000000] [--formats csv,jsonl,parquet]
    python bench/scale.py export [--sizes 100000,300000,1000000] [--database sqlite|postgresql|both]
    python bench/scale.py collect [--sizes 100000,1000000] [--database sqlite|postgresql|both]

submit: for each format and size, a generated dataset is read by the raw reference (the library's chunked
reader, one ``json.dumps`` per row: pandas for CSV and JSONL, pyarrow for Parquet) and then submitted
(``runs.submit``: validate every row, then enqueue every chunk into Redis), each in its own process, timed
inside it (interpreter start-up left out of both) with its peak RSS (VmHWM) sampled from outside.

export: a results table of ``--rows`` rows is filled directly with SQLAlchemy (one bulk INSERT per 50,000 rows,
not through the collector), then each format is exported by ``export_run`` beside a raw reference (the same
rows streamed from the same query straight into csv.writer / json.dumps / a pyarrow ParquetWriter).

collect: N results are put on the result stream (with their run's event first, not timed), then a collector
(``Collector.run(burst=True)`` at the default settings, with the metrics observer ``enqueue.py collect`` has)
drains them into a fresh database, beside a raw reference: the same N rows, already in memory as dicts, upserted
by SQLAlchemy Core (``INSERT ... ON CONFLICT (run_id, row_key) DO UPDATE``, executemany) into a fresh ``results``
table made by the same ``store.make_engine``, one transaction per batch of COLLECTOR_BATCH rows (the collector's
batch). On PostgreSQL each side gets a schema of its own, created for it, with autovacuum off on its tables: the
tables are never analysed while measured (the worst case of a big first run). Both run in their own process,
timed inside it, with their peak RSS.

Uses BENCH_REDIS_URL (default redis://127.0.0.1:6379/1, flushed: never a Redis in use).
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import run_with_peak_rss  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
PG_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TEMPLATE = "Classify: {{ review }}"


# ---------------------------------------------------------------- measuring a child process


def measured(args: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run ``python bench/scale.py ARGS`` (a child that prints one JSON line); return it and its peak RSS in MB."""
    peak_mb, code, stdout, stderr = run_with_peak_rss([__file__, *args], env or dict(os.environ))
    if code != 0:
        sys.exit(f"{' '.join(args[:2])} failed: {stderr.strip()[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), peak_mb


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
        reader = (
            pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=10_000)
            if path.suffix == ".csv"
            else pd.read_json(path, lines=True, dtype=False, chunksize=10_000)
        )
        for frame in reader:
            for record in frame.to_dict(orient="records"):
                json.dumps(record)
                rows += 1
    return {"rows": rows, "seconds": time.perf_counter() - started}


def pipeline_submit(path: Path, chunk_size: int) -> dict[str, Any]:
    """``runs.submit`` as the CLI calls it (validating pass, then every chunk enqueued), timed in-process."""
    from pipeline.control import runs  # datasets: pandas and pyarrow, imported before the clock as the reference's
    from pipeline.intake import datasets  # datasets: pandas and pyarrow, imported before the clock as the reference's
    from pipeline.queue import connect
    from pipeline.settings import Settings

    assert datasets  # runs imports it only when a file is read: here, before the clock
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
    print(
        f"submit: chunk size {chunk_size}, template {TEMPLATE!r}, --id-column id; time in-process, "
        "peak RSS of each process (VmHWM)"
    )
    print(
        f"{'format':8} {'rows':>9} {'MB':>5} | {'reference rows/s':>16} {'us/row':>6} {'RSS MB':>6} | "
        f"{'submit rows/s':>13} {'us/row':>6} {'RSS MB':>6} | ratio | redis"
    )
    try:
        for fmt in formats:
            for rows in sizes:
                client.flushdb()
                dataset = write_dataset(work / f"data-{rows}.{fmt}", rows, fmt)
                reference, reference_mb = measured(["_raw", str(dataset)])
                submitted, submit_mb = measured(["_submit", str(dataset), str(chunk_size)])
                assert reference["rows"] == submitted["rows"] == rows, (reference, submitted)
                ref_rate, rate = rows / reference["seconds"], rows / submitted["seconds"]
                print(
                    f"{fmt:8} {rows:>9,} {dataset.stat().st_size / 1e6:>5.0f} | {ref_rate:>16,.0f} "
                    f"{1e6 / ref_rate:>6.2f} {reference_mb:>6.0f} | {rate:>13,.0f} {1e6 / rate:>6.2f} "
                    f"{submit_mb:>6.0f} | {rate / ref_rate:>5.2f} | {client.info('memory')['used_memory_human']}",
                    flush=True,
                )
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
        elif command in ("_collect", "_collect_raw"):
            print(json.dumps(collect_child(command, rest[0], int(rest[1]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    submit = sub.add_parser("submit")
    submit.add_argument("--sizes", default="100000,1000000,3000000")
    submit.add_argument("--formats", default="csv,jsonl,parquet")
    submit.add_argument("--chunk-size", type=int, default=1000)
    export = sub.add_parser("export")
    export.add_argument("--sizes", default="100000,300000,1000000")
    export.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="sqlite")
    export.add_argument("--formats", default="csv,jsonl,parquet")
    collect = sub.add_parser("collect")
    collect.add_argument("--sizes", default="100000,1000000")
    collect.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    if args.bench == "submit":
        bench_submit([int(s) for s in args.sizes.split(",")], args.formats.split(","), args.chunk_size)
    elif args.bench == "collect":
        bench_collect([int(s) for s in args.sizes.split(",")], args.database)
    else:
        bench_export([int(s) for s in args.sizes.split(",")], args.database, args.formats.split(","))


# ---------------------------------------------------------------- export

RUN_ID = "rbenchexport0001"


def fill_results(url: str, rows: int) -> None:
    """A run of ``rows`` results, inserted straight into the tables (bulk INSERTs of 50,000 rows)."""
    import time as clock

    from sqlalchemy import insert, text

    from pipeline.collect import store, writes

    engine = store.make_engine(url)
    with engine.begin() as conn:
        conn.execute(store.results.delete())
        conn.execute(store.runs.delete())
        writes.save_run(conn, bench_config(rows, RUN_ID), "completed")
    now = clock.time()
    for start in range(0, rows, 50_000):
        batch = [
            {
                "run_id": RUN_ID,
                "row_key": f"r{i:08d}",
                "row_index": i,
                "status": "failed" if i % 50 == 0 else "succeeded",
                "input": {"id": f"r{i:08d}", "review": f'=The strap broke after a week, "honestly" #{i}'},
                "prompt_hash": f"{i:064x}",
                "answer": None if i % 50 == 0 else "positive",
                "parsed": None if i % 3 else {"label": "positive", "score": i % 7},
                "error": "HTTP 500" if i % 50 == 0 else None,
                "provider": "fake",
                "model": "fake",
                "attempts": 1,
                "timeouts": 0,
                "rate_limited": 0,
                "input_tokens": 30,
                "output_tokens": 2,
                "cost_nano": 1234,
                "latency_ms": 12.5,
                "cached": i % 4 == 0,
                "calls": {"fake|fake|200": 1},
                "finished_at": now,
            }
            for i in range(start, min(rows, start + 50_000))
        ]
        with engine.begin() as conn:
            conn.execute(insert(store.results), batch)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ANALYZE results"))
    engine.dispose()


def raw_export(url: str, fmt: str, out: Path) -> int:
    """The reference: the same rows, same query order, streamed from the driver's cursor straight into
    csv.writer / json.dumps / a pyarrow ParquetWriter, the input JSON column decoded once a row."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    count, writer = 0, None
    columns = [
        "row_key",
        "status",
        "answer",
        "parsed",
        "error",
        "provider",
        "model",
        "input_tokens",
        "output_tokens",
        "cost_nano",
        "latency_ms",
        "cached",
        "attempts",
        "input",
    ]
    query = text(f"SELECT {', '.join(columns)} FROM results WHERE run_id = :run ORDER BY row_index")
    with engine.connect() as conn, out.open("w", newline="", encoding="utf-8") as handle:
        result = conn.execution_options(stream_results=True, yield_per=10_000).execute(query, {"run": RUN_ID})
        writer_csv = csv.writer(handle)
        for page in result.partitions(10_000):  # (without a size: pages of one row for a text() query)
            page = [
                list(r[:-1]) + list((json.loads(r[-1]) if isinstance(r[-1], str) else r[-1]).values()) for r in page
            ]
            if fmt == "csv":
                writer_csv.writerows(page)
            elif fmt == "jsonl":
                names = columns[:-1] + ["id", "review"]
                handle.writelines(json.dumps(dict(zip(names, r)), default=str) + "\n" for r in page)
            else:
                table = pa.table(
                    {
                        f"c{i}": pa.array([str(v) if v is not None else None for v in col], pa.string())
                        for i, col in enumerate(zip(*page))
                    }
                )
                if writer is None:
                    writer = pq.ParquetWriter(out.with_suffix(".parquet"), table.schema)
                writer.write_table(table)
            count += len(page)
    if writer is not None:
        writer.close()
    engine.dispose()
    return count


def export_child(command: str, url: str, fmt: str, out: str) -> dict[str, Any]:
    started, cpu = time.perf_counter(), time.process_time()
    if command == "_export_raw":
        rows = raw_export(url, fmt, Path(out))
    else:
        from pipeline.collect import store
        from pipeline.output.export import export_run

        engine = store.make_engine(url)
        rows = export_run(engine, RUN_ID, fmt, Path(out))
    return {"rows": rows, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def bench_export(sizes: list[int], database: str, formats: list[str]) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    urls = []
    if database in ("sqlite", "both"):
        urls.append(("sqlite", f"sqlite:///{work / 'results.db'}"))
    if database in ("postgresql", "both"):
        urls.append(("postgresql", _pg_schema_url()))
    print(
        "export: results filled by bulk INSERT into the tables store.make_engine makes; time in-process, "
        "peak RSS of each process (VmHWM)"
    )
    print("us/row: wall time; cpu: CPU time of that process alone (the database server's is in neither)")
    print(
        f"{'database':10} {'format':8} {'rows':>9} | {'reference rows/s':>16} {'us/row':>6} {'cpu':>5} "
        f"{'RSS MB':>6} | {'export rows/s':>13} {'us/row':>6} {'cpu':>5} {'RSS MB':>6} | ratio | load"
    )
    try:
        for name, url in urls:
            for rows in sizes:
                fill_results(url, rows)
                for fmt in formats:
                    out = work / f"out.{fmt}"
                    reference, reference_mb = measured(["_export_raw", url, fmt, str(out)])
                    exported, export_mb = measured(["_export", url, fmt, str(out)])
                    assert reference["rows"] == exported["rows"] == rows, (reference, exported)
                    ref_rate, rate = rows / reference["seconds"], rows / exported["seconds"]
                    print(
                        f"{name:10} {fmt:8} {rows:>9,} | {ref_rate:>16,.0f} {1e6 / ref_rate:>6.2f} "
                        f"{1e6 * reference['cpu'] / rows:>5.1f} {reference_mb:>6.0f} | {rate:>13,.0f} "
                        f"{1e6 / rate:>6.2f} {1e6 * exported['cpu'] / rows:>5.1f} {export_mb:>6.0f} | "
                        f"{rate / ref_rate:>5.2f} | {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if database in ("postgresql", "both"):
            _drop_pg_schema()


PG_SCHEMA = "bench_scale_export"


def _pg_schema_url(schema: str = PG_SCHEMA) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def _drop_pg_schema(schema: str = PG_SCHEMA) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


# ---------------------------------------------------------------- collect

COLLECT_RUN_ID = "rbenchcollect001"


def bench_result(i: int, now: float):
    """One result as a worker hands it over: a short input, an answer, one call's spending."""
    from pipeline.records import SUCCEEDED, Result

    key = f"r{i:08d}"
    return Result(
        run_id=COLLECT_RUN_ID,
        row_key=key,
        row_index=i,
        status=SUCCEEDED,
        input={"id": key, "review": f"The strap broke after a week, honestly #{i}"},
        prompt_hash=f"{i:064x}",
        answer="ECHO: negative",
        provider="fake",
        model="fake",
        attempts=1,
        input_tokens=30,
        output_tokens=2,
        cost_nano=1234,
        latency_ms=12.5,
        finished_at=now + i * 1e-6,
        calls={"fake|fake|200": 1},
    )


def bench_config(rows: int, run_id: str = COLLECT_RUN_ID):
    """The benchmarks' run: ``rows`` rows of the fake provider in chunks of 100."""
    from pipeline.records import RunConfig

    return RunConfig(
        run_id=run_id,
        dataset="bench.csv",
        dataset_hash="0" * 64,
        template=TEMPLATE,
        provider="fake",
        model="fake",
        total_rows=rows,
        total_chunks=max(1, rows // 100),
    )


def fresh_tables(url: str):
    """The pipeline's tables, new; on PostgreSQL with autovacuum off, so that they stay never analysed."""
    from sqlalchemy import text

    from pipeline.collect import store

    engine = store.make_engine(url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            for table in ("results", "runs"):
                conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
    return engine


def raw_upsert(url: str, rows: int) -> dict[str, Any]:
    """The reference: the same rows as dicts (made before the clock starts), SQLAlchemy Core's batched upsert."""
    from sqlalchemy.dialects import postgresql, sqlite

    from pipeline.collect import store
    from pipeline.settings import Settings

    engine = fresh_tables(url)
    batch = Settings(_env_file=None).collector_batch
    now = time.time()
    values = [{c: getattr(r, c) for c in store.RESULT_COLUMNS} for r in (bench_result(i, now) for i in range(rows))]
    insert = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(store.results)
    upsert = insert.on_conflict_do_update(
        index_elements=["run_id", "row_key"],
        set_={c: insert.excluded[c] for c in store.RESULT_COLUMNS if c not in ("run_id", "row_key")},
    )
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, rows, batch):
        with engine.begin() as conn:
            conn.execute(upsert, values[start : start + batch])
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    engine.dispose()
    return {"rows": rows, "seconds": seconds, "cpu": cpu}


def pipeline_collect(url: str, rows: int) -> dict[str, Any]:
    """A burst collector with the metrics observer, as ``enqueue.py collect`` runs it, draining the stream."""
    from sqlalchemy import func, select

    from pipeline.collect import store
    from pipeline.collect.collector import Collector
    from pipeline.collect.metrics import PipelineMetrics
    from pipeline.queue import connect
    from pipeline.settings import Settings

    engine = fresh_tables(url)
    settings = Settings(
        _env_file=None, redis_url=REDIS_URL, database_url=url, log_level="WARNING", data_dir=Path(tempfile.gettempdir())
    )
    connection = connect(settings)
    metrics = PipelineMetrics(settings, connection, engine)
    collector = Collector(settings, connection, engine, observers=[metrics.observe])
    started, cpu = time.perf_counter(), time.process_time()
    written = collector.run(burst=True)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    with engine.connect() as conn:
        run = store.get_run(conn, COLLECT_RUN_ID) or {}
        stored = conn.execute(select(func.count()).select_from(store.results)).scalar_one()
    engine.dispose()
    return {
        "rows": written,
        "seconds": seconds,
        "cpu": cpu,
        "stored": stored,
        "status": run.get("status"),
        "rows_succeeded": run.get("rows_succeeded"),
        "cost_nano": run.get("cost_nano"),
    }


def collect_child(command: str, url: str, rows: int) -> dict[str, Any]:
    return raw_upsert(url, rows) if command == "_collect_raw" else pipeline_collect(url, rows)


def hand_over(rows: int) -> None:
    """The run's event, then ``rows`` results on the bench Redis's result stream, as workers hand them over."""
    import redis

    from pipeline import handoff
    from pipeline.settings import Settings

    settings = Settings(_env_file=None)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    handoff.publish_event(client, settings.result_stream, handoff.RUN, bench_config(rows).to_dict())
    now = time.time()
    for start in range(0, rows, 1000):
        handoff.publish_results(
            client, settings.result_stream, [bench_result(i, now) for i in range(start, min(rows, start + 1000))]
        )
    client.close()


def bench_collect(sizes: list[int], database: str) -> None:
    import redis

    work = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    names = [n for n in ("sqlite", "postgresql") if database in (n, "both")]
    client = redis.Redis.from_url(REDIS_URL)
    print(
        "collect: results drained from the stream by a burst collector (default settings, metrics observer) "
        "vs SQLAlchemy batched upsert of the same rows; fresh tables (PostgreSQL: never analysed); time "
        "in-process, peak RSS (VmHWM)"
    )
    print("us/row: wall time; cpu: CPU time of that process alone (the database server's is in neither)")
    print(
        f"{'database':10} {'rows':>9} | {'reference rows/s':>16} {'us/row':>6} {'cpu':>5} {'RSS MB':>6} | "
        f"{'collector rows/s':>16} {'us/row':>6} {'cpu':>5} {'RSS MB':>6} | ratio | load"
    )
    try:
        for name in names:
            for rows in sizes:
                urls = []
                for side in ("raw", "collector"):
                    if name == "sqlite":
                        urls.append(f"sqlite:///{work / f'{side}-{rows}.db'}")
                    else:
                        urls.append(_pg_schema_url(f"bench_collect_{side}"))
                reference, reference_mb = measured(["_collect_raw", urls[0], str(rows)])
                hand_over(rows)
                collected, collect_mb = measured(["_collect", urls[1], str(rows)])
                assert collected["rows"] == collected["stored"] == collected["rows_succeeded"] == rows, collected
                assert collected["status"] == "completed" and collected["cost_nano"] == 1234 * rows, collected
                assert client.xlen(result_stream()) == 0
                ref_rate, rate = rows / reference["seconds"], rows / collected["seconds"]
                print(
                    f"{name:10} {rows:>9,} | {ref_rate:>16,.0f} {1e6 / ref_rate:>6.1f} "
                    f"{1e6 * reference['cpu'] / rows:>5.1f} {reference_mb:>6.0f} | {rate:>16,.0f} "
                    f"{1e6 / rate:>6.1f} {1e6 * collected['cpu'] / rows:>5.1f} {collect_mb:>6.0f} | "
                    f"{rate / ref_rate:>5.2f} | {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                for side in ("raw", "collector"):
                    if name == "sqlite":
                        for suffix in ("", "-wal", "-shm"):
                            Path(f"{work / f'{side}-{rows}.db'}{suffix}").unlink(missing_ok=True)
                    else:
                        _drop_pg_schema(f"bench_collect_{side}")
    finally:
        client.flushdb()
        client.close()
        shutil.rmtree(work, ignore_errors=True)
        if "postgresql" in names:
            for side in ("raw", "collector"):
                _drop_pg_schema(f"bench_collect_{side}")


def result_stream() -> str:
    from pipeline.settings import Settings

    return Settings(_env_file=None).result_stream


if __name__ == "__main__":
    main()
