"""The process-wide window of provider calls: one event loop per worker process that every chunk feeds.

A chunk is RQ's unit of recovery, not of concurrency. A worker process is long-lived and runs several chunk jobs
at once in threads; each job hands its rows to this window and waits for them. The window keeps
WORKER_CONCURRENCY calls in flight across all the chunks it holds, so neither a chunk's tail nor a hanging row
idles the process, and it keeps warm what a fork per chunk used to throw away: the Redis pool, the providers'
HTTP clients and TLS contexts, the price table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from pipeline.calls.redis_batch import RedisBatcher
from pipeline.handoff import HandOver
from pipeline.pricing import PriceTable
from pipeline.providers import Provider, build_provider
from pipeline.queue import async_client
from pipeline.settings import Settings

T = TypeVar("T")


class Ticket:
    """A chunk's rows reserved in the window before the chunk starts: the worker counts them at once, so it
    does not take more chunks than the window can start; each row gives its place up as it starts (or is
    skipped), and closing the ticket gives up the rest."""

    def __init__(self, window: CallWindow, rows: int) -> None:
        self._window = window
        self.unstarted = rows

    def started(self, rows: int = 1) -> None:
        self._window._move(backlog=-self._take(rows))

    def _take(self, rows: int) -> int:
        rows = min(rows, self.unstarted)
        self.unstarted -= rows
        return rows

    def close(self) -> None:
        self.started(self.unstarted)


class CallWindow:
    """An event loop on its own thread, with the calls in flight capped for the whole process."""

    def __init__(self, settings: Settings, connection: redis.Redis) -> None:
        self.settings = settings
        self.connection = connection
        self.capacity = settings.worker_concurrency
        self.prices = PriceTable.load(settings.price_file)
        self.in_flight = 0
        self.backlog = 0  # rows of accepted chunks that have not taken a place yet
        self.draining = False  # the worker is stopping: chunks start no new row
        self._room = threading.Condition()
        self._providers: dict[str, Provider] = {}
        self.prompts_in_flight: dict[str, asyncio.Future[Any]] = {}  # cache key -> the answer being asked
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="call-window", daemon=True)
        self._thread.start()
        self.client: aioredis.Redis = self.run(self._open())

    async def _open(self) -> aioredis.Redis:
        self._slots = asyncio.Semaphore(self.capacity)
        client = async_client(self.settings, self.connection)
        self.reads = RedisBatcher(client, transaction=False)  # what rows run before their calls: lookups, holds
        self.writes = RedisBatcher(client, transaction=True)  # hand-overs, answers stored, holds settled
        self.hand_over = HandOver(self.writes, self.settings.result_stream)
        return client

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the window's loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def provider(self, name: str) -> Provider:
        """The process's one provider client of that name (built on first use, then kept warm)."""
        if name not in self._providers:
            self._providers[name] = build_provider(name, self.settings)
        return self._providers[name]

    def reserve(self, rows: int) -> Ticket:
        self._move(backlog=rows)
        return Ticket(self, rows)

    def place(self, ticket: Ticket) -> _Place:
        """``async with``: hold one of the window's places for a row's calls (waits while the window is full)."""
        return _Place(self, ticket)

    def drain(self) -> None:
        self.draining = True

    def wait_for_room(self, timeout: float) -> bool:
        """Block until the window could start more rows than the accepted chunks hold (or ``timeout``)."""
        with self._room:
            return self._room.wait_for(self._has_room, timeout)

    def _has_room(self) -> bool:
        return self.in_flight + self.backlog < self.capacity

    def _move(self, *, in_flight: int = 0, backlog: int = 0) -> None:
        """Change the counts; wake the worker waiting for room only when there is room now and was none before (a
        waiter checks first, so nobody waits while there is room): not on every row that ends."""
        with self._room:
            had_room = self._has_room()
            self.in_flight += in_flight
            self.backlog += backlog
            if not had_room and self._has_room():
                self._room.notify_all()

    def close(self) -> None:
        if not self._loop.is_running():
            return
        with contextlib.suppress(Exception):
            self.run(self._close_clients())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _close_clients(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        await self.client.aclose()


class _Place:
    """A row's place in the window (a class, not a generator context manager: one per row, it is on the hot path)."""

    __slots__ = ("_ticket", "_window")

    def __init__(self, window: CallWindow, ticket: Ticket) -> None:
        self._window, self._ticket = window, ticket

    async def __aenter__(self) -> None:
        await self._window._slots.acquire()
        self._window._move(in_flight=1, backlog=-self._ticket._take(1))  # one lock for both counts

    async def __aexit__(self, *_: object) -> None:
        self._window._move(in_flight=-1)
        self._window._slots.release()


_window: CallWindow | None = None
_window_pid = 0
_window_lock = threading.Lock()


def process_window(settings: Settings, connection: redis.Redis) -> CallWindow:
    """This process's window, opened on first use (a forked child opens its own: threads do not survive fork)."""
    global _window, _window_pid
    with _window_lock:
        if _window is None or _window_pid != os.getpid():
            _window, _window_pid = CallWindow(settings, connection), os.getpid()
        return _window


def close_process_window() -> None:
    global _window
    with _window_lock:
        if _window is not None and _window_pid == os.getpid():
            _window.close()
        _window = None
