"""Speed benchmark (issue 8): the pipeline at its default settings, each figure beside a raw reference.

    python bench/speed.py --scenario fast                  # one scenario at its full size
    python bench/speed.py --scenario all                   # fast, faults, rpm, slow, scaling (~12 min)
    python bench/speed.py --scenario fast --rows 2000      # a quick check (--rows applies to every run)

Each scenario starts the fake provider (tests/fakeprovider.py) as its own process, and measures against it
- the raw reference: one asyncio loop in this process, one aiohttp ClientSession (TCPConnector(limit=0)) that
  POSTs the same chat-completions bodies at the pipeline's total concurrency (processes x
  Settings().worker_concurrency), parses the JSON, applies the same timeout (REQUEST_TIMEOUT) and retries 5xx,
  timeouts and 429s (Retry-After honoured, the pipeline's backoff otherwise) until every row is answered; no
  queue, no SQL. For the rate-limited scenarios the reference is the limit itself;
- the pipeline: the dataset submitted in this process (pipeline.control.runs.submit: openai, gpt-4o-mini, max_tokens 16,
  the response cache on as by default: every prompt is distinct, so each row looks up, claims and stores),
  then ``python enqueue.py collect`` and ``python worker.py --burst --processes N`` (N = 2 unless said) as
  subprocesses, at the pipeline's DEFAULT settings: every pipeline setting variable this script does
  not set itself is removed from the environment, and none of concurrency or chunk size is passed. Each run gets
  a fresh SQLite file in a temp dir and the Redis DB at BENCH_REDIS_URL (default redis://127.0.0.1:6379/1),
  flushed before and after: never point it at a Redis in use.

Scenarios and the figures they print:
  fast     0.2 s latency, no limit, 12,000 rows. Rows/s end to end into SQL (rows with a result, from starting the
           workers until the last result is seen in SQL, polled every 0.1 s) beside the reference's rows/s, and
           the ratio. CPU ms per row of the whole pipeline (worker pool with all its descendants + collector +
           the submit in this process) beside the reference's. The load average at the start (every scenario).
  faults   0.05 s latency; 5 % of calls answer 500 and 1 % hang 20 s (never paid), at random; REQUEST_TIMEOUT=5
           for the pipeline and the reference; 12,000 rows. Rows/s, the reference's, the ratio; rows failed;
           prompts paid twice (the fake server answered the same prompt more than once).
  rpm      The server enforces 3,000 RPM and the run is submitted with rpm=3000; 0.2 s latency, 4,000 rows. Once
           with the server's 1 s token bucket, once with a 10 s sliding window (at most 500 calls in any 10 s).
           Then "tpm": the server also enforces a TPM limit that binds at half of 3,000 RPM (its own count:
           prompt tokens + max_tokens per call) and the run has tpm equal to it; 2,000 rows. Prints the admitted
           rate as a share of the limit (the server's admitted calls, or tokens, over the time from its first to
           its last admitted call; and "steady": whole windows after the first, the last partial second left
           out; a 1 s bucket lets up to 1 s of budget above the rate, so up to ~101 % is within the limit),
           429s as a share of all calls, rows failed.
  slow     2 s latency, no limit, 20,000 rows. Calls in flight at the server (sampled every 0.1 s: median and
           mean between 20 % and 80 % of the time calls were in flight, and the max) as a share of the
           configured total, beside the reference's (which keeps the same total in flight).
  scaling  0.2 s latency, no limit, 6,000 rows with 1, 2 and 4 worker processes: CPU ms per row for each (the
           accounting of fast) beside the reference's at the same total concurrency, and the spread
           (max / min - 1).

CPU accounting (exact, no sampling): the worker pool and the collector each lead a process group of their own,
and this process is made a child subreaper (prctl), so every process of their trees is reaped either by its
parent inside the tree or, orphaned, by this process. The kernel adds a reaped process's CPU (user + system),
including everything it reaped itself, to its reaper's children usage; so the pipeline subprocesses' CPU is the
growth of getrusage(RUSAGE_CHILDREN) from their start until their whole groups are reaped. "workers" is what
is reaped when the pool has exited by itself (burst), "collector" what is reaped after it is stopped (SIGTERM)
once the last result is in SQL, "submit" is time.process_time() around runs.submit in this process. The
reference's CPU is time.process_time() around its whole run. The fake server's CPU is in neither.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BENCH_REDIS_URL,
    ROOT,
    fake_provider_stats,
    reset_fake_provider,
    row_text,
    start_fake_provider,
    write_dataset,
)
from pipeline.calls.retry import RetryPolicy
from pipeline.collect import store
from pipeline.control import runs
from pipeline.queue import connect
from pipeline.settings import Settings
from tests.fakeprovider import _tokens as fake_provider_tokens

MODEL = "gpt-4o-mini"
TEMPLATE = "Echo: {{ text }}"
MAX_TOKENS = 16
WIDTH = 7  # zero-padded row numbers: every prompt has the same length and token count
API_KEY = "sk-bench"
PROCESSES = 2  # worker processes unless a scenario says otherwise
SCALING = (1, 2, 4)  # worker processes of the scaling scenario
RPM = 3000
HANG_SECONDS = 20.0
FAULTS_TIMEOUT = 5.0
SAMPLE_SECONDS = 0.1  # in-flight sampling at the server
POLL_SECONDS = 0.1  # SQL polling for the last result
STALL_SECONDS = 120.0  # give up on a run when no result came for this long (15 s once the workers exited)
POOL_EXIT_SECONDS = 120.0
REFERENCE_MAX_ATTEMPTS = 30
PR_SET_CHILD_SUBREAPER = 36


# --- processes ------------------------------------------------------------------------------------------------


def become_subreaper() -> bool:
    """Orphaned descendants of our children are re-parented to this process (so we reap them, and count them)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def children_cpu() -> float:
    """CPU seconds (user + system) of every child reaped so far, with everything they reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap_group(pgid: int, deadline: float) -> bool:
    """Reap the group's members that are (or become, orphaned) our children; True once none is left."""
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-pgid, os.WNOHANG)[0]:
                pass
        if not _group_exists(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class Children:
    """The subprocesses a measurement starts, each leading its own process group (its whole tree). On exit,
    errors and Ctrl-C included, every group still alive is terminated (SIGTERM, then SIGKILL) and reaped."""

    def __init__(self) -> None:
        self._leaders: list[subprocess.Popen] = []
        self._ended: set[int] = set()  # groups fully reaped: their ids may be reused, never signal them again

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for leader in reversed(self._leaders):
            self.stop(leader, grace=10)

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        return self.adopt(subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True))

    def adopt(self, leader: subprocess.Popen) -> subprocess.Popen:
        self._leaders.append(leader)
        return leader

    def wait(self, leader: subprocess.Popen, timeout: float) -> bool:
        """Wait for the group to end by itself; on timeout stop it and return False."""
        if self._wait_group(leader, time.monotonic() + timeout):
            return True
        self.stop(leader, grace=10)
        return False

    def stop(self, leader: subprocess.Popen, grace: float = 30) -> None:
        if leader.pid in self._ended:
            return
        _signal_group(leader.pid, signal.SIGTERM)
        if not self._wait_group(leader, time.monotonic() + grace):
            _signal_group(leader.pid, signal.SIGKILL)
            self._wait_group(leader, time.monotonic() + 10)

    def _wait_group(self, leader: subprocess.Popen, deadline: float) -> bool:
        try:
            leader.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        if not _reap_group(leader.pid, deadline):
            return False
        self._ended.add(leader.pid)
        return True


# --- the fake provider ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    latency: float
    rpm: float | None = None
    tpm: float | None = None
    window: str = "bucket"  # or "sliding" (10 s)
    error_rate: float = 0.0
    hang_rate: float = 0.0
    sample: bool = False  # sample the calls in flight

    @property
    def window_seconds(self) -> int:
        return 10 if self.window == "sliding" else 1

    def args(self) -> list[str]:
        args = [
            "--window",
            self.window,
            "--window-seconds",
            str(self.window_seconds),
            "--error-rate",
            str(self.error_rate),
            "--hang-rate",
            str(self.hang_rate),
            "--hang-seconds",
            str(HANG_SECONDS),
        ]
        if self.tpm:
            args += ["--tpm", str(self.tpm)]
        if self.sample:
            args += ["--sample-in-flight", str(SAMPLE_SECONDS)]
        return args


@contextlib.contextmanager
def fake_server(server: Server) -> Iterator[str]:
    """The fake provider as its own process for the block; yields its URL."""
    with Children() as children:
        process, url = start_fake_provider(server.latency, server.rpm, server.args(), start_new_session=True)
        children.adopt(process)
        try:
            yield url
        finally:
            children.stop(process, grace=2)  # calls still hanging would hold a graceful exit for up to 20 s


def prompt(i: int) -> str:
    """What the template renders for row i."""
    return f"Echo: {row_text(i, WIDTH)}"


def tpm_binding_at(share_of_rpm: float) -> int:
    """A TPM limit (as the fake server counts tokens: prompt + max_tokens) reached at this share of RPM."""
    return round(RPM * share_of_rpm * (fake_provider_tokens(prompt(0)) + MAX_TOKENS))


# --- the raw reference ----------------------------------------------------------------------------------------


@dataclass
class Reference:
    rows: int
    concurrency: int
    succeeded: int = 0
    calls: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    server: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return self.rows - self.succeeded

    @property
    def rate(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_row(self) -> float:
        return 1000 * self.cpu / max(self.succeeded, 1)


def run_reference(url: str, rows: int, concurrency: int, timeout: float, policy: RetryPolicy) -> Reference:
    reset_fake_provider(url)
    reference = Reference(rows, concurrency)
    cpu, started = time.process_time(), time.monotonic()
    asyncio.run(_reference(reference, url, timeout, policy))
    reference.seconds, reference.cpu = time.monotonic() - started, time.process_time() - cpu
    reference.server = fake_provider_stats(url)
    return reference


async def _reference(reference: Reference, url: str, timeout: float, policy: RetryPolicy) -> None:
    endpoint = f"{url}/v1/chat/completions"
    pending = iter(range(reference.rows))  # shared by the lanes: each takes the next row
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as session:

        async def lane() -> None:
            for i in pending:
                body = {"model": MODEL, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": MAX_TOKENS}
                answered = await _ask(session, endpoint, body, reference, policy)
                reference.succeeded += answered  # not `+= await`: that reads the count before the await

        await asyncio.gather(*(lane() for _ in range(min(reference.concurrency, reference.rows))))


async def _ask(
    session: aiohttp.ClientSession, endpoint: str, body: dict[str, Any], reference: Reference, policy: RetryPolicy
) -> bool:
    for attempt in range(1, REFERENCE_MAX_ATTEMPTS + 1):
        reference.calls += 1
        try:
            async with session.post(endpoint, json=body) as response:
                if response.status == 200:
                    answer = await response.json()
                    return answer["choices"][0]["message"]["content"] is not None
                await response.read()
                if response.status != 429 and response.status < 500:
                    return False
                delay = policy.backoff(attempt, _retry_after(response.headers))
        except (TimeoutError, aiohttp.ClientError):
            delay = policy.backoff(attempt, None)
        await asyncio.sleep(delay)
    return False


def _retry_after(headers: Any) -> float | None:
    with contextlib.suppress(KeyError, ValueError):
        return float(headers["retry-after-ms"]) / 1000
    with contextlib.suppress(KeyError, ValueError):
        return float(headers["retry-after"])
    return None


# --- the pipeline ---------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    rows: int
    processes: int
    seconds: float  # from starting the workers until the last result was seen in SQL
    results: dict[str, int]  # by status
    run: dict[str, Any]  # the runs row
    errors: list[tuple[str, int]]  # the commonest errors of failed rows
    cpu_submit: float
    cpu_workers: float
    cpu_collector: float
    server: dict[str, Any]  # the fake server's stats for this run only
    submit_seconds: float = 0.0  # wall time of runs.submit, before the workers start

    @property
    def whole_rate(self) -> float:
        """Rows per second from the start of the submit until the last result was in SQL."""
        total = self.submit_seconds + self.seconds
        return self.done / total if total else 0.0

    @property
    def done(self) -> int:
        return sum(self.results.values())

    @property
    def failed(self) -> int:
        return self.results.get("failed", 0)

    @property
    def lost(self) -> int:
        return self.rows - self.done

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def ms_per_row(self, cpu: float) -> float:
        return 1000 * cpu / max(self.done, 1)

    @property
    def cpu_ms_per_row(self) -> float:
        return self.ms_per_row(self.cpu_submit + self.cpu_workers + self.cpu_collector)

    def cpu_text(self) -> str:
        return (
            f"{self.cpu_ms_per_row:.2f} ms (workers {self.ms_per_row(self.cpu_workers):.2f} + collector "
            f"{self.ms_per_row(self.cpu_collector):.2f} + submit {self.ms_per_row(self.cpu_submit):.2f})"
        )


def clean_environment() -> list[str]:
    """Drop every pipeline setting from this process's environment (the subprocesses inherit it)."""
    names = {name.upper() for name in Settings.model_fields}
    removed = sorted(key for key in os.environ if key.upper() in names)
    for key in removed:
        del os.environ[key]
    return removed


def bench_settings(work: Path, url: str) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=work,
        redis_url=BENCH_REDIS_URL,
        database_url=f"sqlite:///{work / 'bench.db'}",
        openai_api_key=API_KEY,
        openai_base_url=f"{url}/v1",
        log_level="WARNING",
        metrics_port=0,
    )


def pipeline_env(settings: Settings, extra: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.resolved_database_url,
        "DATA_DIR": str(settings.data_dir),
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": settings.openai_base_url,
        "LOG_LEVEL": "WARNING",
        "METRICS_PORT": "0",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def run_pipeline(
    url: str,
    rows: int,
    processes: int = PROCESSES,
    rpm: int | None = None,
    tpm: int | None = None,
    extra_env: dict[str, str] | None = None,
    profile: Path | None = None,
) -> Pipeline:
    """Submit, work and collect one run of ``rows`` rows against the fake server at ``url``."""
    reset_fake_provider(url)
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
        settings = bench_settings(Path(tmp), url)
        connection = connect(settings)
        connection.flushdb()
        engine = store.make_engine(settings.resolved_database_url)
        try:
            dataset = write_dataset(Path(tmp) / "rows.jsonl", rows, WIDTH)
            cpu, started = time.process_time(), time.monotonic()
            run_id = runs.submit(
                connection,
                settings,
                runs.RunRequest(
                    dataset=dataset,
                    template=TEMPLATE,
                    provider="openai",
                    model=MODEL,
                    max_tokens=MAX_TOKENS,
                    id_column="id",
                    rpm=rpm,
                    tpm=tpm,
                ),
            ).run_id
            cpu_submit, submit_seconds = time.process_time() - cpu, time.monotonic() - started
            with Children() as children:
                seconds, cpu_workers, cpu_collector = work_and_collect(
                    children, engine, run_id, rows, processes, pipeline_env(settings, extra_env or {}), profile
                )
            return Pipeline(
                rows,
                processes,
                seconds,
                *read_results(engine, run_id),
                cpu_submit,
                cpu_workers,
                cpu_collector,
                fake_provider_stats(url),
                submit_seconds,
            )
        finally:
            engine.dispose()
            flush(connection)


def flush(connection: redis.Redis) -> None:
    connection.flushdb()
    connection.close()


def work_and_collect(
    children: Children,
    engine: Engine,
    run_id: str,
    rows: int,
    processes: int,
    env: dict[str, str],
    profile: Path | None = None,
) -> tuple[float, float, float]:
    """Run the collector and a burst worker pool until every row is in SQL; returns the seconds from the
    workers' start to the last result, and the CPU seconds of the worker pool's tree and of the collector.
    With ``profile`` (a folder), py-spy samples the collector and the pool with its workers (its CPU is then
    in the figures: use a profiled run for the profile only)."""
    before = children_cpu()
    collector = children.start([sys.executable, "enqueue.py", "collect"], env)
    started = time.monotonic()
    pool = children.start([sys.executable, "worker.py", "--burst", "--processes", str(processes)], env)
    spies = (
        [start_spy(collector.pid, profile / "collector.txt"), start_spy(pool.pid, profile / "workers.txt")]
        if profile
        else []
    )
    finished = wait_for_results(engine, run_id, rows, pool)
    if not children.wait(pool, POOL_EXIT_SECONDS):
        print(f"  (the worker pool did not exit within {POOL_EXIT_SECONDS:.0f} s after the last result: stopped)")
    after_pool = children_cpu()
    children.stop(collector)
    for spy in spies:
        spy.wait(timeout=60)
    return finished - started, after_pool - before, children_cpu() - after_pool


def start_spy(pid: int, output: Path) -> subprocess.Popen:
    """``py-spy record`` of a process and its children, raw (collapsed stacks), until the process exits."""
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_summary(raw: Path, top: int = 12) -> list[str]:
    """Where the samples of a py-spy raw profile were: by what was running (self time: the leaf frame's package,
    our module, or the stdlib module) and by our functions on the stack (inclusive)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(text) for text in stack.split(";")]
        frames = [frame for frame in frames if frame]  # process and thread markers left out
        leaf = _place(frames[-1][1]) if frames else "(no Python frame)"
        own[leaf] = own.get(leaf, 0) + count
        for name in {
            f"{path.removesuffix('.py')}.{function}" for function, path in frames if path.startswith("pipeline/")
        }:
            inclusive[name] = inclusive.get(name, 0) + count

    def ranked(counts: dict[str, int]) -> str:
        ordered = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{name} {n / max(total, 1):.0%}" for name, n in ordered)

    return [f"{total} samples", f"self: {ranked(own)}", f"inclusive (ours): {ranked(inclusive)}"]


def _frame(text: str) -> tuple[str, str] | None:
    """``function (path:line)`` -> (function, path); None for py-spy's process and thread markers."""
    if not text.endswith(")") or " (" not in text:
        return None
    function, _, where = text[:-1].rpartition(" (")
    return function, where.rpartition(":")[0]


def _place(path: str) -> str:
    """Our module as it is, a library by its top package, the stdlib by module, imports as one."""
    if path.startswith(("pipeline/", "bench/", "tests/")) or path in ("worker.py", "enqueue.py"):
        return path
    if path.startswith("<frozen importlib"):
        return "imports"
    return path.split("/")[0].removesuffix(".py")


def wait_for_results(engine: Engine, run_id: str, rows: int, pool: subprocess.Popen) -> float:
    """The monotonic time at which SQL held a result for every row (or the last result came, when giving up)."""
    done, progress_at = -1, time.monotonic()
    while True:
        with engine.connect() as conn:
            run = store.get_run(conn, run_id)
        now = time.monotonic()
        count = run["rows_succeeded"] + run["rows_failed"] if run else 0
        if count >= rows:
            return now
        if count != done:
            done, progress_at = count, now
        elif now - progress_at > (15 if pool.poll() is not None else STALL_SECONDS):
            print(f"  (gave up waiting: {count} of {rows} rows have a result, none came for {now - progress_at:.0f} s)")
            return progress_at
        time.sleep(POLL_SECONDS)


def read_results(engine: Engine, run_id: str) -> tuple[dict[str, int], dict[str, Any], list[tuple[str, int]]]:
    with engine.connect() as conn:
        errors = conn.execute(
            select(store.results.c.error, func.count())
            .where(store.results.c.run_id == run_id, store.results.c.status == "failed")
            .group_by(store.results.c.error)
            .order_by(func.count().desc())
            .limit(3)
        ).all()
        return store.count_results(conn, run_id), store.get_run(conn, run_id) or {}, [tuple(e) for e in errors]


# --- figures --------------------------------------------------------------------------------------------------


def show(label: str, text: str) -> None:
    print(f"  {label:<12} {text}", flush=True)


def share(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def header(name: str, description: str, defaults: Settings, processes: tuple[int, ...] = (PROCESSES,)) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n== {name}: {description}", flush=True)
    in_flight = ", ".join(f"{n} x {defaults.worker_concurrency} = {n * defaults.worker_concurrency}" for n in processes)
    show("defaults", f"processes x worker_concurrency: {in_flight} in flight; chunk size {defaults.chunk_size}")
    show("load avg", f"{load} at the start ({os.cpu_count()} CPUs)")


def paid_twice(stats: dict[str, Any]) -> tuple[int, int]:
    """(prompts answered more than once, extra answers)."""
    counts = [n for n in stats["paid"].values() if n > 1]
    return len(counts), sum(counts) - len(counts)


def calls_text(stats: dict[str, Any]) -> str:
    by_status = stats["by_status"]
    return f"{stats['requests']} calls at the server: " + ", ".join(
        f"{n} x {code}" for code, n in sorted(by_status.items())
    )


def show_rows(pipeline: Pipeline) -> None:
    show(
        "rows",
        f"{pipeline.rows}: {pipeline.results.get('succeeded', 0)} succeeded, {pipeline.failed} failed, "
        f"{pipeline.lost} without a result; {pipeline.seconds:.1f} s end to end",
    )
    for error, count in pipeline.errors:
        show("", f"{count} x {error[:150]}")


def show_throughput(pipeline: Pipeline, reference: Reference) -> None:
    show(
        "pipeline",
        f"{pipeline.rate:.1f} rows/s end to end into SQL ({pipeline.done} rows in "
        f"{pipeline.seconds:.2f} s from worker start)",
    )
    show(
        "reference",
        f"{reference.rate:.1f} rows/s ({reference.succeeded} rows in {reference.seconds:.2f} s, "
        f"aiohttp, {reference.concurrency} in flight, {reference.calls} calls)",
    )
    show("ratio", f"{share(pipeline.rate, reference.rate)} of the reference")


def show_cpu(pipeline: Pipeline, reference: Reference) -> None:
    show("CPU/row", f"pipeline {pipeline.cpu_text()}")
    show(
        "",
        f"reference {reference.cpu_ms_per_row:.2f} ms; pipeline / reference = "
        f"{pipeline.cpu_ms_per_row / max(reference.cpu_ms_per_row, 1e-9):.1f}x",
    )


@dataclass(frozen=True)
class Admitted:
    """What the server admitted, from its per-second series."""

    total: float  # calls or tokens
    span: float  # seconds from the first to the last admitted call
    steady: float | None  # per second, over whole windows after the first (last partial second left out)
    steady_seconds: int

    @classmethod
    def of(cls, stats: dict[str, Any], total_key: str, series_key: str, window: int) -> Admitted:
        series = stats[series_key]
        complete = len(series) - 1
        whole = (complete - window) // window * window
        steady = sum(series[window : window + whole]) / whole if whole > 0 else None
        span = (stats["last_admitted"] - stats["first_admitted"]) if stats["first_admitted"] is not None else 0.0
        return cls(stats[total_key], span, steady, max(whole, 0))

    def text(self, unit: str, per_minute: float) -> str:
        limit = per_minute / 60
        rate = self.total / self.span if self.span else math.nan
        steady = (
            f"; steady {share(self.steady, limit)} ({self.steady:.1f}/s over {self.steady_seconds} s)"
            if self.steady is not None
            else "; run too short for a steady state"
        )
        return (
            f"{rate:.1f} {unit}/s = {share(rate, limit)} of the {per_minute:.0f}/min limit ({self.total:.0f} "
            f"in {self.span:.1f} s, first to last admitted){steady}"
        )


def in_flight(stats: dict[str, Any]) -> tuple[float, float, int]:
    """(median, mean) of the sampled calls in flight between 20 % and 80 % of the time calls were in flight,
    and the max the server saw."""
    samples = stats["in_flight_samples"]
    busy = [t for t, n in samples if n > 0]
    if not busy:
        return 0.0, 0.0, stats["in_flight_max"]
    low, high = busy[0] + 0.2 * (busy[-1] - busy[0]), busy[0] + 0.8 * (busy[-1] - busy[0])
    steady = [n for t, n in samples if low <= t <= high] or [0]
    return statistics.median(steady), statistics.fmean(steady), stats["in_flight_max"]


# --- scenarios ------------------------------------------------------------------------------------------------


def policy_of(defaults: Settings) -> RetryPolicy:
    return RetryPolicy(backoff_base=defaults.backoff_base, backoff_max=defaults.backoff_max)


def fast(defaults: Settings, rows: int | None) -> None:
    rows = rows or 12_000
    header("fast", f"0.2 s latency, no limit, {rows} rows", defaults)
    with fake_server(Server(latency=0.2)) as url:
        reference = run_reference(
            url, rows, PROCESSES * defaults.worker_concurrency, defaults.request_timeout, policy_of(defaults)
        )
        pipeline = run_pipeline(url, rows)
    show_throughput(pipeline, reference)
    show_cpu(pipeline, reference)
    show_rows(pipeline)


def faults(defaults: Settings, rows: int | None) -> None:
    rows = rows or 12_000
    header(
        "faults",
        f"0.05 s latency, 5 % of calls 500, 1 % hang {HANG_SECONDS:.0f} s, REQUEST_TIMEOUT="
        f"{FAULTS_TIMEOUT:.0f}, {rows} rows",
        defaults,
    )
    with fake_server(Server(latency=0.05, error_rate=0.05, hang_rate=0.01)) as url:
        reference = run_reference(
            url, rows, PROCESSES * defaults.worker_concurrency, FAULTS_TIMEOUT, policy_of(defaults)
        )
        pipeline = run_pipeline(url, rows, extra_env={"REQUEST_TIMEOUT": str(FAULTS_TIMEOUT)})
    show_throughput(pipeline, reference)
    show("failed", f"pipeline {pipeline.failed} rows (+{pipeline.lost} without a result), reference {reference.failed}")
    prompts, extra = paid_twice(pipeline.server)
    ref_prompts, _ref_extra = paid_twice(reference.server)
    show("paid twice", f"pipeline {prompts} prompts ({extra} extra answers), reference {ref_prompts}")
    show(
        "calls",
        f"pipeline: {calls_text(pipeline.server)}; attempts {pipeline.run.get('attempts')}, "
        f"timeouts {pipeline.run.get('timeouts')}",
    )
    show("", f"reference: {calls_text(reference.server)}")
    show_rows(pipeline)


def rate_limited(defaults: Settings, rows: int | None) -> None:
    tpm = tpm_binding_at(0.5)
    variants = [
        ("rpm, 1 s bucket", Server(latency=0.2, rpm=RPM), rows or 4000, None),
        ("rpm, 10 s sliding window", Server(latency=0.2, rpm=RPM, window="sliding"), rows or 4000, None),
        (
            f"tpm {tpm} (binds at half of {RPM} RPM), 1 s bucket",
            Server(latency=0.2, rpm=RPM, tpm=tpm),
            rows or 2000,
            tpm,
        ),
    ]
    for name, server, count, run_tpm in variants:
        header(
            name,
            f"server and run at {RPM} RPM{f' and {tpm} TPM' if run_tpm else ''}, 0.2 s latency, {count} rows",
            defaults,
        )
        with fake_server(server) as url:
            pipeline = run_pipeline(url, count, rpm=RPM, tpm=run_tpm)
        stats = pipeline.server
        calls = Admitted.of(stats, "admitted_total", "admitted_per_second", server.window_seconds)
        show("admitted", calls.text("calls", RPM))
        if run_tpm:
            tokens = Admitted.of(stats, "admitted_tokens", "tokens_per_second", server.window_seconds)
            show("tokens", tokens.text("tokens", run_tpm) + " (the reference: the limit itself)")
        throttled = stats["by_status"].get("429", 0)
        show(
            "429s",
            f"{throttled} of {stats['requests']} calls ({share(throttled, stats['requests'])}); "
            f"rows failed {pipeline.failed}, without a result {pipeline.lost}",
        )
        show_rows(pipeline)


def slow(defaults: Settings, rows: int | None) -> None:
    rows = rows or 20_000
    total = PROCESSES * defaults.worker_concurrency
    header("slow", f"2 s latency, no limit, {rows} rows", defaults)
    with fake_server(Server(latency=2.0, sample=True)) as url:
        reference = run_reference(url, rows, total, defaults.request_timeout, policy_of(defaults))
        pipeline = run_pipeline(url, rows)
    median, mean, peak = in_flight(pipeline.server)
    show(
        "in flight",
        f"pipeline median {median:.0f} = {share(median, total)} of the configured {total} "
        f"(mean {mean:.0f}, max {peak}), between 20 % and 80 % of the run",
    )
    median, mean, peak = in_flight(reference.server)
    show("", f"reference median {median:.0f} = {share(median, total)} (mean {mean:.0f}, max {peak})")
    show_throughput(pipeline, reference)
    show_rows(pipeline)


def scaling(defaults: Settings, rows: int | None) -> None:
    rows = rows or 6000
    header("scaling", f"0.2 s latency, no limit, {rows} rows, 1, 2 and 4 worker processes", defaults, SCALING)
    measured: list[tuple[Pipeline, Reference]] = []
    with fake_server(Server(latency=0.2)) as url:
        for processes in SCALING:
            total = processes * defaults.worker_concurrency
            reference = run_reference(url, rows, total, defaults.request_timeout, policy_of(defaults))
            pipeline = run_pipeline(url, rows, processes=processes)
            measured.append((pipeline, reference))
            show(
                f"{processes} x {defaults.worker_concurrency}",
                f"CPU/row pipeline {pipeline.cpu_text()}, reference {reference.cpu_ms_per_row:.2f} ms; "
                f"{pipeline.rate:.0f} rows/s vs {reference.rate:.0f} ({pipeline.failed} failed, "
                f"{pipeline.lost} without a result)",
            )
    show(
        "spread",
        f"pipeline CPU/row {spread([p.cpu_ms_per_row for p, _ in measured]):.1%} (max / min - 1), "
        f"reference {spread([r.cpu_ms_per_row for _, r in measured]):.1%}",
    )


def zero(defaults: Settings, rows: int | None) -> None:
    """The whole path's own cost: a fake provider answering at once, so that nothing but the pipeline (submit,
    queue, 2 worker processes, hand-over, collector, SQL) sets the rate; then once more under py-spy."""
    rows = rows or 20_000
    header("zero", f"0 ms latency, no limit, {rows} rows", defaults)
    with fake_server(Server(latency=0.0)) as url:
        reference = run_reference(
            url, rows, PROCESSES * defaults.worker_concurrency, defaults.request_timeout, policy_of(defaults)
        )
        pipeline = run_pipeline(url, rows)
        show(
            "whole path",
            f"{pipeline.whole_rate:.1f} rows/s from submit to the last result in SQL (submit "
            f"{pipeline.submit_seconds:.2f} s + workers to SQL {pipeline.seconds:.2f} s)",
        )
        show_throughput(pipeline, reference)
        show_cpu(pipeline, reference)
        show_rows(pipeline)
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
            profiled = run_pipeline(url, rows, profile=Path(folder))
            show("profiled", f"{profiled.rate:.1f} rows/s workers to SQL under py-spy (200 Hz, nonblocking)")
            for name in ("workers", "collector"):
                raw = Path(folder) / f"{name}.txt"
                for n, line in enumerate(profile_summary(raw) if raw.exists() else ["(no profile written)"]):
                    show(name if n == 0 else "", line)


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1 if min(values) > 0 else math.nan


def _interrupt(*_: object) -> None:
    """Ctrl-C raises at once, inside the reference's event loop too (asyncio.run's own handler only cancels its
    main task, which aiohttp calls in flight may swallow)."""
    raise KeyboardInterrupt


SCENARIOS = {"fast": fast, "faults": faults, "rpm": rate_limited, "slow": slow, "scaling": scaling, "zero": zero}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="fast")
    parser.add_argument("--rows", type=int, help="rows of every run, instead of each scenario's own size")
    args = parser.parse_args()
    removed = clean_environment()
    defaults = Settings(_env_file=None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as for Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)
    print(
        f"bench Redis {BENCH_REDIS_URL} (flushed before and after each run); pipeline defaults: "
        f"worker_concurrency {defaults.worker_concurrency}, chunk_size {defaults.chunk_size}, "
        f"request_timeout {defaults.request_timeout:g} s"
        + (f"; removed from the environment: {', '.join(removed)}" if removed else "")
    )
    if not become_subreaper():
        print("warning: not a child subreaper: CPU of processes orphaned inside the pipeline is not counted")
    try:
        for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
            SCENARIOS[name](defaults, args.rows)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
