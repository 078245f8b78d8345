"""The command line: submit datasets, watch, export and manage runs. A thin layer over ``pipeline``."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click
import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from pipeline import users
from pipeline.calls.workers import run_worker
from pipeline.collect import store
from pipeline.collect.collector import Collector, serve_collector
from pipeline.control import runs
from pipeline.control.schedules import build_scheduler, firing_key, load_runs_file
from pipeline.errors import ConfigError, PipelineError
from pipeline.handoff import StreamReader
from pipeline.intake.estimate import Estimate
from pipeline.intake.progress import BYTES, Progress, RateWindow
from pipeline.intake.userfiles import read_text
from pipeline.logs import setup_logging
from pipeline.output.export import FORMATS, export_run
from pipeline.queue import connect
from pipeline.redaction import redact
from pipeline.settings import Settings, load_settings

log = logging.getLogger("pipeline.cli")


class Context:
    """Settings, Redis and the database, opened only when a command needs them."""

    def __init__(self) -> None:
        self.settings: Settings = load_settings()
        self._redis: redis.Redis | None = None
        self._engine: Engine | None = None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = connect(self.settings)
        return self._redis

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = store.make_engine(self.settings.resolved_database_url)
        return self._engine


def fails_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Known failures become one line on stderr and exit code 2; no traceback for bad input."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PipelineError as exc:
            _die(str(exc))
        except redis.ConnectionError as exc:
            _die(f"cannot reach Redis ({exc}); check REDIS_URL")
        except redis.RedisError as exc:
            _die(f"Redis error ({type(exc).__name__}: {exc}); check REDIS_URL")
        except SQLAlchemyError as exc:
            _die(f"database error: {type(exc).__name__}: {str(exc).splitlines()[0]}; check DATABASE_URL")
        except OSError as exc:
            _die(f"{exc.filename or 'file'}: {exc.strerror or exc}")
        except Exception as exc:  # a bug: still one line, the traceback goes to the log at DEBUG
            log.debug("unexpected error", exc_info=True)
            _die(f"unexpected error: {type(exc).__name__}: {exc} (LOG_LEVEL=DEBUG shows where)")

    return wrapper


def _die(message: str) -> None:
    click.echo(f"error: {redact(message)}", err=True)
    sys.exit(2)


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Batch LLM pipeline: one LLM call per dataset row, answers in SQL."""
    ctx.obj = Context()
    setup_logging(ctx.obj.settings, "cli")


def run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("dataset", type=click.Path(path_type=Path), required=False),
        click.option(
            "--config",
            "runs_file",
            type=click.Path(path_type=Path),
            help="A runs file (TOML); --name picks the run. Its key defaults to NAME@schedule slot.",
        ),
        click.option("--template", "-t", help="Jinja2 prompt template, e.g. 'Classify: {{ review }}'."),
        click.option("--template-file", type=click.Path(path_type=Path), help="Read the template from a file."),
        click.option(
            "--provider",
            "-p",
            default="fake",
            show_default=True,
            help="fake, openai, anthropic or compatible (an OpenAI-compatible server).",
        ),
        click.option("--model", "-m", help="Model name (default: fake for the fake provider)."),
        click.option("--system", "system_prompt", help="System prompt."),
        click.option("--temperature", type=float),
        click.option("--max-tokens", type=click.IntRange(1), default=256, show_default=True),
        click.option("--param", "params", multiple=True, help="Extra provider parameter KEY=JSON (repeatable)."),
        click.option("--json-schema", type=click.Path(path_type=Path), help="Validate answers as JSON."),
        click.option("--fallback", "fallbacks", multiple=True, help="PROVIDER:MODEL used if the primary fails."),
        click.option("--id-column", help="Column holding a unique row id (default: row position)."),
        click.option("--chunk-size", type=click.IntRange(1), help="Rows per job."),
        click.option("--max-cost", type=click.FloatRange(0), help="Stop the run before spending more USD."),
        click.option(
            "--price-in",
            type=click.FloatRange(0),
            help="USD per million input tokens of --model, for a model without a price (with --price-out).",
        ),
        click.option("--price-out", type=click.FloatRange(0), help="USD per million output tokens of --model."),
        click.option("--no-cache", is_flag=True, help="Call the provider even for answers already cached."),
        click.option("--rpm", type=click.IntRange(1), help="Requests/minute shared by all workers."),
        click.option("--tpm", type=click.IntRange(1), help="Tokens/minute shared by all workers."),
        click.option("--name", help="A name for the run."),
        click.option("--idempotency-key", help="Same key, same run (e.g. the nightly date)."),
        click.option(
            "--mode",
            type=click.Choice(["online", "batch"]),
            default="online",
            show_default=True,
            help="batch: the provider's batch API (openai, anthropic) at half the price, results within 24 h.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_request(
    dataset: Path | None,
    runs_file: Path | None,
    template: str | None,
    template_file: Path | None,
    provider: str,
    model: str | None,
    params: tuple[str, ...],
    json_schema: Path | None,
    no_cache: bool,
    allowed_dir: Path | None = None,
    **fields: Any,
) -> runs.RunRequest:
    """``allowed_dir`` (ALLOWED_DATA_DIR) bounds the template and schema files as well as the dataset."""
    if runs_file is not None:
        return named_request(runs_file, fields.get("name"), fields.get("idempotency_key"), allowed_dir)
    if dataset is None:
        raise ConfigError("give a DATASET file, or --config RUNS_FILE --name NAME")
    if (template is None) == (template_file is None):
        raise ConfigError("give exactly one of --template or --template-file")
    if template_file is not None:
        template = read_text(template_file, "template", allowed_dir)
    model = runs.model_for(provider, model, "--model")
    return runs.RunRequest(
        dataset=dataset,
        template=template or "",
        provider=provider,
        model=model,
        params=_parse_params(params),
        json_schema=_read_schema(json_schema, allowed_dir),
        use_cache=not no_cache,
        **fields,
    )


def named_request(
    runs_file: Path, name: str | None, key: str | None, allowed_dir: Path | None = None
) -> runs.RunRequest:
    named_runs = load_runs_file(runs_file, allowed_dir)
    if name not in named_runs:
        raise ConfigError(f"{runs_file}: no run named {name!r} (have: {', '.join(named_runs)})")
    named = named_runs[name]
    return replace(named.request, idempotency_key=key or firing_key(named, datetime.now(UTC)))


def _parse_params(params: tuple[str, ...]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def _read_schema(path: Path | None, allowed_dir: Path | None = None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(read_text(path, "JSON schema", allowed_dir))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON schema ({exc})") from None


class StageBars:
    """Draws a submit's progress: one bar per stage (reading, hashing, enqueueing), each with its total and
    percentage. ``disable=None`` draws only on a terminal."""

    def __init__(self, quiet: bool = False, file: Any = None, disable: bool | None = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.disable = True if quiet else disable
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.stage != self.stage or self.bar is None:
            self.close()
            self.stage = progress.stage
            in_bytes = progress.unit == BYTES
            self.bar = tqdm(
                total=progress.total,
                desc=f"{progress.stage:<10}",
                file=self.file,
                disable=self.disable,
                unit=progress.unit if in_bytes else f" {progress.unit}",
                unit_scale=in_bytes,
                unit_divisor=1024 if in_bytes else 1000,
            )
        self.bar.update(progress.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def do_submit(ctx: Context, request: runs.RunRequest, quiet: bool) -> runs.SubmitReport:
    record = store.open_engine(ctx.settings.resolved_database_url)  # SQL, if Redis lost a run it has done
    try:
        with StageBars(quiet) as bars:
            report = runs.submit(ctx.redis, ctx.settings, request, progress=bars, engine=record)
    finally:
        record.dispose()
    if report.unpriced:  # said once, here: status and runs then show the cost as unknown
        click.echo(
            f"note: no price for {', '.join(report.unpriced)}: the run's cost will show as unknown "
            "(PRICE_FILE or --price-in/--price-out give one)",
            err=True,
        )
    return report


def print_submit(report: runs.SubmitReport, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.__dict__))
        return
    state = "existing run" if report.existing else "run"
    click.echo(
        f"{state} {report.run_id}: {report.rows} rows in {report.chunks} chunks, {report.jobs_enqueued} jobs enqueued"
    )


@cli.command()
@run_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate the whole file and print rows, cached rows, tokens, cost "
    "and time at the run's RPM/TPM; enqueue nothing.",
)
@click.pass_obj
@fails_cleanly
def submit(ctx: Context, as_json: bool, dry_run: bool, **options: Any) -> None:
    """Validate DATASET and enqueue one job per chunk. Prints the run id."""
    request = build_request(**options, allowed_dir=ctx.settings.allowed_data_dir)
    if dry_run:
        with StageBars(as_json) as bars:
            estimate = runs.dry_run(ctx.redis, ctx.settings, request, progress=bars)
        print_estimate(estimate, as_json)
        return
    report = do_submit(ctx, request, quiet=as_json)
    print_submit(report, as_json)


def print_estimate(estimate: Estimate, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(estimate.to_dict()))
        return
    e = estimate
    click.echo(f"dry run {e.run_id}: nothing enqueued")
    click.echo(
        f"  rows       {e.rows}: {e.rows_cached} answered by the cache or an earlier row's call, "
        f"{e.rows - e.rows_cached} need a call"
    )
    click.echo(f"  tokens     about {e.input_tokens} in (estimate), at most {e.output_tokens} out")
    cost = (
        f"at most ${e.cost_usd:.6f} at {e.model}'s price"
        if e.cost_usd is not None
        else f"unknown price: no price for {e.model} (PRICE_FILE or --price-in/--price-out give one)"
    )
    click.echo(f"  cost       {cost}")
    limits = " / ".join(f"{value} {name}" for name, value in (("RPM", e.rpm), ("TPM", e.tpm)) if value)
    time_needed = (
        f"at least {e.seconds} s at {limits}"
        if e.seconds is not None
        else "no RPM/TPM limit set: depends on the provider's latency and WORKER_CONCURRENCY"
    )
    click.echo(f"  time       {time_needed}")


@cli.command()
@run_options
@click.pass_obj
@fails_cleanly
def run(ctx: Context, as_json: bool, **options: Any) -> None:
    """Submit, work and collect in this one process (small jobs, demos), then print the summary."""
    request = build_request(**options, allowed_dir=ctx.settings.allowed_data_dir)
    if request.mode == "batch":
        raise ConfigError("a batch-mode run takes up to 24 h: `submit --mode batch` it and keep `worker.py` running")
    report = do_submit(ctx, request, quiet=as_json)
    if not as_json:
        print_submit(report, as_json)
    quiet = ctx.settings.model_copy(update={"log_level": "WARNING"})  # the summary is the output here
    setup_logging(quiet, "cli")
    run_worker(quiet, burst=True, with_scheduler=False)
    consumer = f"{socket.gethostname()}-run-{os.getpid()}"  # a collector service may be running beside it
    Collector(ctx.settings, ctx.redis, ctx.engine, consumer=consumer).run(burst=True)
    print_status(runs.run_status(ctx.redis, ctx.engine, report.run_id), as_json)


@cli.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", is_flag=True, help="Show a live progress bar until the run ends.")
@click.pass_obj
@fails_cleanly
def status(ctx: Context, run_id: str, as_json: bool, watch: bool) -> None:
    """Rows done / failed / pending, tokens, cost and elapsed time of a run."""
    if watch:
        watch_run(ctx, run_id)
    print_status(runs.run_status(ctx.redis, ctx.engine, run_id, ctx.settings.queue_name), as_json)


WATCH_WINDOW_SECONDS = 30.0
WATCH_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows [{elapsed}{postfix}]"


def watch_run(ctx: Context, run_id: str, interval: float = 1.0) -> None:
    """A live bar; its rate and ETA come from this watch's own samples of the last WATCH_WINDOW_SECONDS."""
    queue = ctx.settings.queue_name
    info = runs.run_status(ctx.redis, ctx.engine, run_id, queue)
    window = RateWindow(WATCH_WINDOW_SECONDS)
    done = info["rows_succeeded"] + info["rows_failed"]
    with tqdm(total=info["rows_total"], initial=done, file=sys.stderr, desc=run_id, bar_format=WATCH_FORMAT) as bar:
        while True:
            done = info["rows_succeeded"] + info["rows_failed"]
            rate = window.add(time.monotonic(), done)
            bar.update(done - bar.n)
            bar.set_postfix_str(watch_postfix(info, rate, queue))
            if info["status"] in store.FINAL_STATUSES:
                return
            time.sleep(interval)
            info = runs.run_status(ctx.redis, ctx.engine, run_id, queue)


def watch_postfix(info: dict[str, Any], rate: float | None, queue: str) -> str:
    parts = ["-- rows/s" if rate is None else f"{rate:.1f} rows/s"]
    left = info["rows_total"] - info["rows_succeeded"] - info["rows_failed"]
    if rate and left > 0:
        parts.append(f"eta {tqdm.format_interval(left / rate)}")
    parts += [f"failed {info['rows_failed']}", f"spend {_dollars(info['cost_usd'], 4)}", info["status"]]
    if info.get("workers") == 0 and info["status"] not in store.FINAL_STATUSES:
        parts.append(f"no worker is consuming queue {queue}")
    return ", ".join(parts)


def print_status(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    click.echo(f"run {info['run_id']}  {info['status']}  ({info['provider']}:{info['model']}, {info['dataset']})")
    click.echo(
        f"  rows       {info['rows_total']} total: {info['rows_succeeded']} succeeded, "
        f"{info['rows_failed']} failed, {info['rows_pending']} pending"
        + (f" ({info['rows_in_handoff']} answered, not yet written)" if info["rows_in_handoff"] else "")
    )
    click.echo(
        f"  cached     {info['rows_cached']} rows; attempts {info['attempts']}, "
        f"429s {info['rate_limited']}, timeouts {info['timeouts']}"
    )
    click.echo(f"  tokens     {info['input_tokens']} in, {info['output_tokens']} out")
    budget = f" of ${info['max_cost']:.4f}" if info["max_cost"] is not None else ""
    unpriced = (
        (
            f" ({info['rows_unpriced']} rows answered by a model without a price; PRICE_FILE or "
            "--price-in/--price-out give one)"
        )
        if info["rows_unpriced"]
        else ""
    )
    click.echo(f"  cost       {_dollars(info['cost_usd'], 6)}{budget}{unpriced}")
    latency = f", avg latency {info['avg_latency_ms']} ms" if info["avg_latency_ms"] is not None else ""
    click.echo(f"  elapsed    {info['elapsed_s']} s{latency}")
    if info.get("mode") == "batch":
        batches = info.get("batches") or {}
        shown = ", ".join(
            f"{batches.get(state, 0)} {state.replace('_', ' ')}"
            for state in ("created", "in_progress", "completed", "expired", "cancelled", "failed")
            if batches.get(state) or state in ("created", "in_progress", "completed", "expired")
        )
        click.echo(f"  batches    {shown}")
    if info.get("note"):
        click.echo(f"  note       {info['note']}")


def _dollars(amount: float | None, places: int) -> str:
    return "unknown" if amount is None else f"${amount:.{places}f}"


@cli.command()
@click.argument("run_id")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="csv", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True)
@click.option(
    "--raw",
    is_flag=True,
    help="CSV: write cells starting with = + - @ tab or CR as they are, without "
    "the leading single quote that keeps spreadsheets from running them as formulas.",
)
@click.pass_obj
@fails_cleanly
def export(ctx: Context, run_id: str, fmt: str, output: Path, raw: bool) -> None:
    """Write the input columns joined with the answers."""
    count = export_run(ctx.engine, run_id, fmt, output, raw=raw)
    click.echo(f"wrote {count} rows to {output}")


@cli.command("runs")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@fails_cleanly
def list_runs(ctx: Context, limit: int, as_json: bool) -> None:
    """Recent runs."""
    with ctx.engine.connect() as conn:
        rows = store.list_runs(conn, limit)
    if as_json:
        click.echo(
            json.dumps(
                [{**{k: v for k, v in r.items() if k != "config"}, "cost_usd": runs.cost_usd(r)} for r in rows],
                default=str,
            )
        )
        return
    click.echo(f"{'run':18} {'status':17} {'rows':>7} {'ok':>7} {'failed':>7} {'cost $':>10}  created")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        cost = runs.cost_usd(r)
        click.echo(
            f"{r['run_id']:18} {r['status']:17} {r['rows_total']:>7} {r['rows_succeeded']:>7} "
            f"{r['rows_failed']:>7} {'unknown' if cost is None else f'{cost:.4f}':>10}  {created}  "
            f"{r['name'] or ''}"
        )


@cli.command()
@click.argument("run_id")
@click.pass_obj
@fails_cleanly
def cancel(ctx: Context, run_id: str) -> None:
    """Stop a run: queued chunks are dropped, running chunks stop before their next row."""
    n = runs.cancel(ctx.redis, ctx.settings, run_id)
    click.echo(f"run {run_id} cancelled ({n} queued jobs removed); answers already paid for are kept")


@cli.command()
@click.argument("run_id")
@click.option("--max-cost", type=click.FloatRange(0), help="A new budget for the run.")
@click.pass_obj
@fails_cleanly
def resume(ctx: Context, run_id: str, max_cost: float | None) -> None:
    """Enqueue every row of the run that has no result yet."""
    n = runs.resume(ctx.redis, ctx.settings, run_id, max_cost=max_cost, engine=ctx.engine)
    click.echo(f"run {run_id} resumed: {n} jobs enqueued")


@cli.command("retry-failed")
@click.argument("run_id")
@click.pass_obj
@fails_cleanly
def retry_failed(ctx: Context, run_id: str) -> None:
    """Enqueue only the failed rows of a run again."""
    n = runs.retry_failed(ctx.redis, ctx.settings, ctx.engine, run_id)
    click.echo(f"run {run_id}: {n} jobs enqueued for failed rows")


@cli.command("replay-parked")
@click.pass_obj
@fails_cleanly
def replay_parked(ctx: Context) -> None:
    """Put the entries the collector parked back on the result stream, to be written again."""
    n = StreamReader(ctx.redis, ctx.settings.result_stream).replay_parked()
    click.echo(f"{n} parked entries put back on {ctx.settings.result_stream}")


@cli.command("create-user")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--admin", is_flag=True, help="May see and act on every run, the CLI's included.")
@click.option("--client", is_flag=True, help="An API client (a service) rather than a person.")
@click.pass_obj
@fails_cleanly
def create_user(ctx: Context, name: str, password_stdin: bool, admin: bool, client: bool) -> None:
    """Add a user (or API client) of the web API and pages; the password is asked for (or read from stdin)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    users.create_user(ctx.engine, name, password, admin=admin, client=client)
    kind = "API client" if client else "admin" if admin else "user"
    click.echo(f"created {kind} {name}")


@cli.command()
@click.option("--burst", is_flag=True, help="Drain the result stream, then exit.")
@click.pass_obj
@fails_cleanly
def collect(ctx: Context, burst: bool) -> None:
    """Run the collector: write results to SQL (the only SQL writer)."""
    setup_logging(ctx.settings, "collector")
    written = serve_collector(ctx.settings, burst=burst)
    click.echo(f"collector wrote {written} results")


@cli.command()
@click.option("--runs", "runs_file", type=click.Path(path_type=Path), required=True, help="The runs file (TOML).")
@click.pass_obj
@fails_cleanly
def schedule(ctx: Context, runs_file: Path) -> None:
    """Run RQ's cron scheduler for the runs file's scheduled runs (each firing submits here: workers read no file)."""
    scheduler = build_scheduler(ctx.redis, ctx.settings, runs_file)
    for job in scheduler.get_jobs():
        when = f"cron '{job.cron}'" if job.cron else f"every {job.interval} s"
        click.echo(f"scheduled {job.name}: {when}")
    scheduler.start()


@cli.command()
@click.argument("run_id")
@click.option("--timeout", type=float, default=3600, show_default=True, help="Seconds to wait.")
@click.option(
    "--max-failed",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Highest fraction of failed rows that still counts as success.",
)
@click.pass_obj
@fails_cleanly
def wait(ctx: Context, run_id: str, timeout: float, max_failed: float) -> None:
    """Wait for a run to end. Exit 0 if it completed within the failure threshold, 1 if not, 3 on timeout, 4 at
    once if Redis lost the run's queue state (nothing would ever finish it: run resume)."""
    deadline = time.monotonic() + timeout
    while True:
        info = runs.run_status(ctx.redis, ctx.engine, run_id)
        if info["status"] in store.FINAL_STATUSES:
            break
        if info["note"]:  # Redis lost the run's queue state: nothing works on it, so it would never end
            click.echo(f"run {run_id}: {info['status']}, but {info['note']}", err=True)
            sys.exit(4)
        if time.monotonic() >= deadline:
            info = runs.run_status(ctx.redis, ctx.engine, run_id, ctx.settings.queue_name)
            note = f" ({info['note']})" if info["note"] else ""
            click.echo(f"run {run_id}: still {info['status']} after {timeout} s{note}", err=True)
            sys.exit(3)
        time.sleep(1.0)
    print_status(info, as_json=False)
    failed_ratio = info["rows_failed"] / info["rows_total"] if info["rows_total"] else 0.0
    if info["status"] != store.COMPLETED or failed_ratio > max_failed:
        click.echo(f"run {run_id}: {info['status']}, {failed_ratio:.1%} of rows failed", err=True)
        sys.exit(1)


if __name__ == "__main__":
    cli()
