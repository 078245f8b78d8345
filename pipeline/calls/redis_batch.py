"""Redis round trips shared by every row of a process: commands staged within one loop tick go out together.

With hundreds of rows in flight, a pipeline per row spent more CPU in the client (a pooled connection, packing,
MULTI/EXEC, parsing) than the provider call did. Rows ``await batcher.run(stage)``; the first one in a tick
starts a flush, which sends everything staged by then in one round trip and hands each row its own replies.
``stage(pipe)`` calls redis-py's command methods on a pipeline that only records them; the replies are raw (bytes,
ints, lists: no redis-py response callbacks, so SET gives b"OK", not True).

What every row does alike (a cache lookup, an answer stored) is better still as one command for the whole flush:
``stage_item(merge, item)`` gathers the items of one ``merge`` and stages them together, in a script that loops
over them server-side. Per row, a command of its own cost more (packing it, reading and routing its reply, and
the server's own per-command work) than the loop does.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection
from redis.commands.core import AsyncScript

Stage = Callable[[Pipeline], Any]
Merge = Callable[[Pipeline, list[Any]], Any]


def stage_script(pipe: Pipeline, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
    """Queue a registered Lua script on a pipeline, by its text: EVALSHA would make redis-py ask the server
    whether it has the script (SCRIPT EXISTS) before every batch, one more round trip per flush; EVAL of the same
    text is compiled once by the server and found again by its hash."""
    pipe.eval(cast(str, script.script), len(keys), *keys, *args)  # registered from our str constants


class RedisBatcher:
    """One flush in flight at a time; what is staged meanwhile goes in the next one. ``transaction=True`` wraps
    each flush in MULTI/EXEC, so each row's commands still apply together."""

    def __init__(self, client: aioredis.Redis, *, transaction: bool) -> None:
        self._client = client
        self._transaction = transaction
        self._staged: list[tuple[Stage, asyncio.Future[list[Any]]]] = []
        self._groups: dict[Merge, _Group] = {}  # items of the next flush, by the merge that stages them
        self._flushing: asyncio.Task[None] | None = None

    async def run(self, stage: Stage) -> list[Any]:
        """Stage commands with ``stage(pipe)`` and wait for their replies, in order; a failed command raises."""
        return await self.stage(stage)

    def stage(self, stage: Stage) -> asyncio.Future[list[Any]]:
        """Stage commands for the next flush without waiting: the future gets their replies (or the error).
        What is staged next in the same loop tick goes in the same flush (in a transaction: applied together)."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._staged.append((stage, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return future

    def stage_item(self, merge: Merge, item: Any) -> asyncio.Future[Any]:
        """Stage one item for the next flush, where ``merge(pipe, items)`` stages one command for all the items
        staged with it, whose reply has one element per item, in order: the future gets this item's element (or
        the command's error, or the error reply a script put in this item's place: an item that failed fails its
        own row, not the others). The command goes where the first of its items was staged."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        group = self._groups.get(merge)
        if group is None:
            group = self._groups[merge] = _Group(merge)
            self.stage(group.stage).add_done_callback(group.deliver)
        group.items.append(item)
        group.futures.append(future)
        return future

    async def _flush(self) -> None:
        try:
            while self._staged:
                batch, self._staged, self._groups = self._staged, [], {}
                await self._send(batch)
        finally:
            self._flushing = None

    async def _send(self, batch: list[tuple[Stage, asyncio.Future[list[Any]]]]) -> None:
        pipe = self._client.pipeline(transaction=self._transaction)  # records the commands; sent by _exchange
        sizes = []
        try:
            for stage, _ in batch:
                before = len(pipe)
                stage(pipe)
                sizes.append(len(pipe) - before)
            replies = await self._execute([args for args, _ in pipe.command_stack])
        except Exception as exc:  # the connection failed: every row of the batch sees it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for (_, future), size in zip(batch, sizes):
            mine, start = replies[start : start + size], start + size
            if future.done():  # its row was cancelled meanwhile; the commands went out all the same
                continue
            error = next((reply for reply in mine if isinstance(reply, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(mine)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One round trip on a pooled connection, retried on a lost connection as redis-py's own commands are
        (its ``retry``: reconnects, and behind sentinels asks them for the primary again)."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            return await connection.retry.call_with_retry(
                lambda: self._exchange(connection, commands), lambda _error: connection.disconnect()
            )
        finally:
            await pool.release(connection)

    async def _exchange(self, connection: Connection, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands (in MULTI/EXEC for a transaction) and read their raw replies: packed by hiredis,
        read under one timeout for the whole batch. redis-py's pipeline packed in Python, read each reply under a
        timeout of its own and ran its response callbacks: per command, more CPU than the row's own work."""
        wrapped = [("MULTI",), *commands, ("EXEC",)] if self._transaction else commands
        await connection.send_packed_command([_pack(args) for args in wrapped], check_health=False)
        try:
            async with asyncio.timeout(connection.socket_timeout):
                replies = [await _reply(connection) for _ in wrapped]
        except TimeoutError:
            raise redis.exceptions.TimeoutError("Timeout reading a batch of replies") from None
        if not self._transaction:
            return replies
        executed = replies[-1]
        if isinstance(executed, Exception):  # EXECABORT: a command was refused when queued, none was applied
            raise next((reply for reply in replies[1:-1] if isinstance(reply, Exception)), executed)
        if not isinstance(executed, list) or len(executed) != len(commands):
            await connection.disconnect()
            raise redis.exceptions.ResponseError("Wrong number of replies from a transaction")
        return executed


class _Group:
    """The items of one merge in one flush, and the futures of the rows that staged them."""

    __slots__ = ("futures", "items", "merge")

    def __init__(self, merge: Merge) -> None:
        self.merge = merge
        self.items: list[Any] = []
        self.futures: list[asyncio.Future[Any]] = []

    def stage(self, pipe: Pipeline) -> None:
        self.merge(pipe, self.items)

    def deliver(self, done: asyncio.Future[list[Any]]) -> None:
        try:
            [reply] = done.result()
            if not isinstance(reply, list) or len(reply) != len(self.futures):
                raise redis.exceptions.ResponseError(f"a merged command answered {reply!r}")
        except Exception as exc:
            for future in self.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, element in zip(self.futures, reply):
            if future.done():  # its row was cancelled meanwhile
                continue
            if isinstance(element, Exception):  # a script's error reply for this item alone ({err = ...} in Lua)
                future.set_exception(element)
            else:
                future.set_result(element)


def _pack(args: tuple[Any, ...]) -> bytes:
    if isinstance(args[0], str) and " " in args[0]:  # a two-word command (CLIENT SETNAME): sent as two words
        args = (*args[0].split(), *args[1:])
    return cast(bytes, hiredis.pack_command(args))


async def _reply(connection: Connection) -> Any:
    """One raw reply; an error reply is returned, not raised (the connection stays usable)."""
    try:
        return await connection.read_response(timeout=math.inf)
    except redis.exceptions.ResponseError as exc:
        return exc
