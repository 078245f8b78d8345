"""Redis round trips shared by every row of a process: commands staged within one loop tick go out together.

With hundreds of rows in flight, a pipeline per row spent more CPU in the client (a pooled connection, packing,
MULTI/EXEC, parsing) than the provider call did. Rows ``await batcher.run(stage)``; the first one in a tick
starts a flush, which sends everything staged by then in one pipeline and hands each row its own replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

Stage = Callable[[Pipeline], Any]


def stage_script(pipe: Pipeline, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
    """Queue a registered Lua script on a pipeline (the pipeline loads it first if the server lacks it)."""
    pipe.scripts.add(script)  # type: ignore[arg-type]  # the asyncio pipeline holds AsyncScripts
    pipe.evalsha(script.sha, len(keys), *keys, *args)


class RedisBatcher:
    """One flush in flight at a time; what is staged meanwhile goes in the next one. ``transaction=True`` wraps
    each flush in MULTI/EXEC, so each row's commands still apply together."""

    def __init__(self, client: aioredis.Redis, *, transaction: bool) -> None:
        self._client = client
        self._transaction = transaction
        self._staged: list[tuple[Stage, asyncio.Future[list[Any]]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def run(self, stage: Stage) -> list[Any]:
        """Stage commands with ``stage(pipe)`` and wait for their replies, in order; a failed command raises."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._staged.append((stage, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._staged:
                batch, self._staged = self._staged, []
                await self._send(batch)
        finally:
            self._flushing = None

    async def _send(self, batch: list[tuple[Stage, asyncio.Future[list[Any]]]]) -> None:
        sizes = []
        try:
            async with self._client.pipeline(transaction=self._transaction) as pipe:
                for stage, _ in batch:
                    before = len(pipe)
                    stage(pipe)
                    sizes.append(len(pipe) - before)
                replies = await pipe.execute(raise_on_error=False)
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
