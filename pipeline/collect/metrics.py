"""Every Prometheus metric, served by the collector.

Workers count nothing themselves: what they did travels inside each result (attempts, 429s, timeouts, calls
by outcome, tokens, cost, latency), and the collector counts a result once, when its SQL write changed it. So
the counters agree with the tables however often worker processes fork, die or are replaced, and no
multiprocess files pile up. Queue and registry sizes, live workers and the hand-over backlog are read from
Redis at scrape time; rows per run and status from the ``runs`` table, so they survive collector restarts.
A scrape never fails because the database is down: the SQL gauges are left out and ``pipeline_database_up``
says 0, while everything Redis knows is still served (that is when the backlog matters most).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Iterable
from itertools import chain
from operator import itemgetter
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector as PromCollector
from prometheus_client.utils import floatToGoString
from rq import Queue, Worker
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from pipeline import handoff
from pipeline.calls import batchstate
from pipeline.collect import store, writes
from pipeline.pricing import NANO
from pipeline.providers.batches import STATES as BATCH_STATES
from pipeline.queue import SERIALIZER
from pipeline.records import RunConfig
from pipeline.settings import Settings

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RECENT_RUNS = 50
FIRST_CODES = ("200", "429", "timeout")  # call outcomes whose series exist from a model's first run on
log = logging.getLogger("pipeline.metrics")

_Tally = dict[tuple[Counter, tuple[str, ...]], float]  # (counter, label values) -> amount summed over a batch


def _add(tally: _Tally, counter: Counter, labels: tuple[str, ...], amount: float) -> None:
    key = (counter, labels)
    tally[key] = tally.get(key, 0) + amount


_status, _calls, _attempts, _usage_estimated, _input_tokens, _output_tokens, _cost_nano, _cached = (
    itemgetter(c)
    for c in (
        "status",
        "calls",
        "attempts",
        "usage_estimated",
        "input_tokens",
        "output_tokens",
        "cost_nano",
        "cached",
    )
)
_positive = (0).__lt__


def _by_target(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (provider, model), "none" for a row without one."""
    targets = list(zip(map(itemgetter("provider"), rows), map(itemgetter("model"), rows)))
    if len(set(targets)) == 1:  # the usual batch
        provider, model = targets[0]
        return {(provider or "none", model or "none"): rows} if rows else {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (provider, model), row in zip(targets, rows):
        groups.setdefault((provider or "none", model or "none"), []).append(row)
    return groups


class PipelineMetrics:
    """Counters fed by the collector's writes, plus scrape-time views of Redis and SQL."""

    def __init__(
        self, settings: Settings, connection: redis.Redis, engine: Engine, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["provider", "model"]
        self.results = Counter(
            "pipeline_results",
            "Results written, by final status",
            ["provider", "model", "status"],
            registry=self.registry,
        )
        self.requests = Counter(
            "pipeline_provider_requests",
            "Provider calls, by outcome (HTTP status, timeout, connection)",
            labels + ["code"],
            registry=self.registry,
        )
        self.retries = Counter(
            "pipeline_retries", "Provider calls that were retries of an earlier call", labels, registry=self.registry
        )
        self.rate_limited = Counter(
            "pipeline_rate_limited", "Calls answered with HTTP 429", labels, registry=self.registry
        )
        self.timeouts = Counter(
            "pipeline_timeouts", "Calls that timed out (possibly billed)", labels, registry=self.registry
        )
        self.cache_hits = Counter(
            "pipeline_cache_hits", "Rows answered from the response cache", labels, registry=self.registry
        )
        self.tokens = Counter("pipeline_tokens", "Tokens used", labels + ["direction"], registry=self.registry)
        self.cost = Counter("pipeline_cost_usd", "Spend in US dollars", labels, registry=self.registry)
        self.estimated_usage = Counter(
            "pipeline_estimated_usage_answers",
            "Answers billed at their reserved worst "
            "case because their usage is not known: none reported, an unreadable "
            "answer, or a call that timed out",
            labels,
            registry=self.registry,
        )
        self.parked = Counter(
            "pipeline_parked_entries",
            "Hand-over entries the collector could not write and "
            "moved to the parked stream (unreadable, or refused by the database)",
            registry=self.registry,
        )
        self.latency = BatchHistogram(
            "pipeline_row_latency_seconds",
            "Time to answer a row, retries included",
            labels,
            LATENCY_BUCKETS,
            self.registry,
        )
        self.last_write = Gauge(
            "pipeline_last_write_timestamp_seconds",
            "Unix time of the collector's last committed SQL write (0 = none since it started)",
            registry=self.registry,
        )
        self.registry.register(_ScrapeTime(settings, connection, engine))

    def observe(self, outcome: Any, applied: writes.Applied) -> None:
        """Count each result that the collector's write changed (a redelivered duplicate changes nothing), and
        the entries it parked (``outcome`` is the collector's BatchOutcome).

        Counts are summed per label set over the batch and each counter moves once per label set: a
        ``labels()`` lookup per row and counter was most of the observer's cost. Latency is observed per row
        (a histogram needs each value), through a labelled child kept per label set."""
        for config in outcome.configs:
            self.start_series(config)
        if outcome.parked:
            self.parked.inc(outcome.parked)
        self.last_write.set(time.time())
        tally: _Tally = {}
        if applied.previous.count(None) == len(applied.previous):  # only new rows: counted by label set at once
            for (provider, model), rows in _by_target(applied.changed).items():
                self._observe_new(tally, provider, model, rows)
        else:
            for result, previous in zip(applied.changed, applied.previous):
                self._observe_one(tally, result, previous)
        for result, previous in applied.extra:  # another paid answer to a row whose result stays: its spend only
            self._observe_spend(tally, result, previous)
        for (counter, labels), amount in tally.items():
            if counter is self.cost:
                amount /= NANO  # summed in nano-dollars, exact, and turned into dollars once
            counter.labels(*labels).inc(amount)

    def start_series(self, config: RunConfig) -> None:
        """Create a run's provider/model label sets at zero before its first result is counted: a series that
        appears with its first increment already in it hides that increment from rate() and increase()."""
        for target in config.targets:
            provider, model = target.provider, target.model
            for status in ("succeeded", "failed"):
                self.results.labels(provider, model, status)
            for code in FIRST_CODES:
                self.requests.labels(provider, model, code)
            for counter in (
                self.retries,
                self.rate_limited,
                self.timeouts,
                self.cache_hits,
                self.cost,
                self.latency,
                self.estimated_usage,
            ):
                counter.labels(provider, model)
            for direction in ("in", "out"):
                self.tokens.labels(provider, model, direction)

    def _observe_one(self, tally: _Tally, result: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """A replaced result (retry-failed) carries its predecessor's calls and spending: count only the rest."""
        provider, model = result["provider"] or "none", result["model"] or "none"
        _add(tally, self.results, (provider, model, result["status"]), 1)
        self._observe_spend(tally, result, previous)
        if result["cached"]:
            _add(tally, self.cache_hits, (provider, model), 1)
        if result["status"] == "succeeded":
            self.latency.observe_many((provider, model), [result["latency_ms"] / 1000.0])

    def _observe_new(self, tally: _Tally, provider: str, model: str, rows: list[dict[str, Any]]) -> None:
        """What ``_observe_one`` counts for rows that replaced nothing, summed a column at a time."""
        target = (provider, model)
        for status, count in collections.Counter(map(_status, rows)).items():
            _add(tally, self.results, (provider, model, status), count)
        paid = collections.Counter(chain.from_iterable(map(dict.items, filter(None, map(_calls, rows)))))
        for (key, count), times in paid.items():
            if count > 0:
                self._count_calls(tally, key, count * times)
        retried = [attempts for attempts in map(_attempts, rows) if attempts > 1]
        if retried:
            _add(tally, self.retries, target, sum(retried) - len(retried))
        estimated = sum(filter(_positive, map(_usage_estimated, rows)))
        if estimated:
            _add(tally, self.estimated_usage, target, estimated)
        _add(tally, self.tokens, (provider, model, "in"), sum(map(_input_tokens, rows)))
        _add(tally, self.tokens, (provider, model, "out"), sum(map(_output_tokens, rows)))
        known = [cost for cost in map(_cost_nano, rows) if cost is not None]
        if known:
            _add(tally, self.cost, target, sum(known))
        cached = sum(map(bool, map(_cached, rows)))
        if cached:
            _add(tally, self.cache_hits, target, cached)
        self.latency.observe_many(target, [row["latency_ms"] / 1000.0 for row in rows if row["status"] == "succeeded"])

    def _count_calls(self, tally: _Tally, key: str, count: int) -> None:
        call_provider, call_model, code = key.split("|", 2)
        _add(tally, self.requests, (call_provider, call_model, code), count)
        if code == "429":
            _add(tally, self.rate_limited, (call_provider, call_model), count)
        elif code == "timeout":
            _add(tally, self.timeouts, (call_provider, call_model), count)

    def _observe_spend(self, tally: _Tally, result: dict[str, Any], previous: dict[str, Any] | None) -> None:
        provider, model = result["provider"] or "none", result["model"] or "none"
        earlier_calls = (previous or {}).get("calls") or {}
        for key, count in (result.get("calls") or {}).items():
            count -= earlier_calls.get(key, 0)
            if count > 0:
                self._count_calls(tally, key, count)
        spent = {
            c: result[c] - (previous[c] if previous else 0)
            for c in ("attempts", "input_tokens", "output_tokens", "usage_estimated")
        }
        if spent["attempts"] > 1:
            _add(tally, self.retries, (provider, model), spent["attempts"] - 1)
        if spent["usage_estimated"] > 0:
            _add(tally, self.estimated_usage, (provider, model), spent["usage_estimated"])
        _add(tally, self.tokens, (provider, model, "in"), spent["input_tokens"])
        _add(tally, self.tokens, (provider, model, "out"), spent["output_tokens"])
        cost_nano = result["cost_nano"]
        if cost_nano is not None:  # unknown (a model without a price) is left out, never counted as free
            _add(tally, self.cost, (provider, model), cost_nano - ((previous or {}).get("cost_nano") or 0))

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Serve /metrics on a daemon thread; returns (server, thread) so callers can shut it down."""
        return start_http_server(port, addr=addr, registry=self.registry)


class BatchHistogram(PromCollector):
    """A histogram by label set that takes a batch's values at once. prometheus_client's Histogram observes one
    value a call (a lock and a bucket search each), which cost the collector as much as all its other counting;
    here a batch's values are sorted once and each bucket's count is a bisection. Exposed like a Histogram's
    (``_bucket`` by ``le``, ``_count``, ``_sum``), without ``_created``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: list[str],
        buckets: Iterable[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = [float(b) for b in buckets]
        self._les = [floatToGoString(b) for b in self.bounds]
        # label values -> count at or under each bound, then every value's count, then their sum
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> None:
        """Create the label set's series at zero."""
        with self._lock:
            self._series.setdefault(tuple(values), [0] * (len(self.bounds) + 2))

    def observe_many(self, labels: tuple[str, ...], values: list[float]) -> None:
        if not values:
            return
        ordered = sorted(values)
        counts = [bisect_right(ordered, bound) for bound in self.bounds]
        with self._lock:
            series = self._series.setdefault(labels, [0] * (len(self.bounds) + 2))
            for i, count in enumerate(counts):
                series[i] += count
            series[-2] += len(ordered)
            series[-1] += sum(ordered)

    def describe(self) -> Iterable[Any]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            snapshot = [(labels, list(series)) for labels, series in self._series.items()]
        for labels, series in snapshot:
            buckets = [*zip(self._les, series), ("+Inf", series[-2])]
            family.add_metric(list(labels), buckets, series[-1])
        yield family


class _ScrapeTime(PromCollector):
    """Gauges read when Prometheus scrapes: RQ queue and registries, workers, stream backlog, rows per run."""

    def __init__(self, settings: Settings, connection: redis.Redis, engine: Engine) -> None:
        self.settings = settings
        self.connection = connection
        self.engine = engine

    def collect(self) -> Iterable[Any]:
        yield from self._queue_metrics()
        up = GaugeMetricFamily(
            "pipeline_database_up",
            "1 if the collector's database answered this scrape's query, else 0 (results then wait in Redis)",
        )
        try:
            sql = list(self._run_metrics())
        except SQLAlchemyError as exc:
            log.warning("database unavailable for /metrics: %s", type(exc).__name__)
            sql = []
        up.add_metric([], 1 if sql else 0)
        yield up
        yield from sql

    def _queue_metrics(self) -> Iterable[Any]:
        queue = Queue(self.settings.queue_name, connection=self.connection, serializer=SERIALIZER)
        jobs = GaugeMetricFamily("pipeline_queue_jobs", "Chunk jobs by RQ registry", labels=["queue", "state"])
        jobs.add_metric([queue.name, "queued"], queue.count)
        for state, registry in (
            ("started", queue.started_job_registry),
            ("failed", queue.failed_job_registry),
            ("scheduled", queue.scheduled_job_registry),
            ("deferred", queue.deferred_job_registry),
        ):
            jobs.add_metric([queue.name, state], registry.count)
        yield jobs
        workers = GaugeMetricFamily("pipeline_workers", "Live RQ workers on the chunk queue", labels=["queue"])
        workers.add_metric([queue.name], Worker.count(queue=queue))
        yield workers
        backlog = GaugeMetricFamily(
            "pipeline_handoff_backlog", "Results (and run events) handed over but not yet written to SQL"
        )
        backlog.add_metric([], handoff.waiting(self.connection, self.settings.result_stream))
        yield backlog
        yield from self._batch_metrics()

    def _batch_metrics(self) -> Iterable[Any]:
        """Batch mode: provider batches by state (open ones now, ended ones since Redis has kept count), the age
        of the oldest open one and the time left before the soonest expiry (absent with no batch open)."""
        open_counts, oldest, soonest = batchstate.open_view(self.connection)
        states = GaugeMetricFamily(
            "pipeline_batches",
            "Provider batches (batch mode) by state: created and "
            "in_progress are open now; completed, expired, cancelled, failed ever ended",
            labels=["state"],
        )
        counts = {state: 0 for state in BATCH_STATES}
        counts.update(batchstate.ended_counts(self.connection))
        counts.update(open_counts)
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        now = time.time()
        age = GaugeMetricFamily(
            "pipeline_batch_oldest_open_age_seconds", "Age of the oldest open provider batch (0 when none is open)"
        )
        age.add_metric([], max(0.0, now - oldest) if oldest is not None else 0.0)
        yield age
        expiry = GaugeMetricFamily(
            "pipeline_batch_expiry_seconds",
            "Seconds until the soonest expiry of an open "
            "provider batch (its unfinished items then expire and go again); no sample when "
            "none is open",
        )
        if soonest is not None:
            expiry.add_metric([], soonest - now)
        yield expiry

    def _run_metrics(self) -> Iterable[Any]:
        """Per-run row gauges for the RECENT_RUNS newest runs (a bounded label set), and runs by status."""
        rows = GaugeMetricFamily(
            "pipeline_run_rows",
            f"Rows per run by status, for the {RECENT_RUNS} newest runs "
            "(from the runs table; failed rows sent again by retry-failed count as pending)",
            labels=["run", "status"],
        )
        active = GaugeMetricFamily("pipeline_runs", "Runs by status", labels=["status"])
        query = (
            select(store.runs.c.run_id, store.runs.c.rows_total, store.runs.c.rows_succeeded, store.runs.c.rows_failed)
            .order_by(store.runs.c.created_at.desc())
            .limit(RECENT_RUNS)
        )
        by_status = select(store.runs.c.status, func.count()).group_by(store.runs.c.status)
        with self.engine.connect() as conn:
            for run_id, total, succeeded, failed in conn.execute(query):
                rows.add_metric([run_id, "succeeded"], succeeded)
                rows.add_metric([run_id, "failed"], failed)
                rows.add_metric([run_id, "pending"], max(total - succeeded - failed, 0))
            for status, count in conn.execute(by_status):
                active.add_metric([status], count)
        yield rows
        yield active
