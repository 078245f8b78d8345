"""Response cache in Redis, keyed by everything that changes the answer, with a claim per prompt being asked.

Lives in Redis, not SQL, because workers never talk to the database (the collector is its only writer).
A cache miss claims the prompt in the same round trip, so a worker that meets a prompt another worker is
asking right now waits for that answer instead of paying for it again. A claim is short and renewed while its
call runs, so a dead worker's claim soon lapses; storing the answer drops it; a failed call turns it into a
short "failed" mark, so the others then ask for themselves, at once and side by side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis
import redis.exceptions

from pipeline.calls.redis_batch import RedisBatcher, stage_script
from pipeline.providers.base import ProviderRequest, ProviderResponse
from pipeline.records import stable_hash

log = logging.getLogger("pipeline.cache")
HIT, ASK, WAIT, ALONE = 1, 0, 2, 3  # what get_or_claim found; ALONE: a call for it just failed, ask unclaimed
FAILED_MARK = "!failed"

# Lookups of one flush, each (answer, claim) as one lookup alone would be. KEYS: answer, claim of each.
# ARGV: claimant, claim ms of each. Returns {verdict, answer or ''} for each, or {-1, error} for a lookup that
# failed (a key of the wrong type): that row fails, not the others of the flush.
_LOOKUP = """
local function lookup(answer_key, claim_key, claimant, ms)
  local answer = redis.call('GET', answer_key)
  if answer then return {1, answer} end
  local owner = redis.call('GET', claim_key)
  if owner == '!failed' then return {3, ''} end
  if owner == claimant then
    redis.call('PEXPIRE', claim_key, ms)
    return {0, ''}
  end
  if redis.call('SET', claim_key, claimant, 'NX', 'PX', ms) then return {0, ''} end
  return {2, ''}
end
local found = {}
for i = 1, #KEYS, 2 do
  local ok, result = pcall(lookup, KEYS[i], KEYS[i + 1], ARGV[i], ARGV[i + 1])
  if not ok then result = {-1, type(result) == 'table' and result.err or tostring(result)} end
  found[#found + 1] = result
end
return found
"""

# Answers of one flush stored, each dropping the claim on it. KEYS: answer, claim of each. ARGV: seconds to
# keep it (0: for ever), the answer of each. Returns 1 for each.
_STORE = """
local stored = {}
for i = 1, #KEYS, 2 do
  if ARGV[i] ~= '0' then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ARGV[i])
  else
    redis.call('SET', KEYS[i], ARGV[i + 1])
  end
  redis.call('DEL', KEYS[i + 1])
  stored[#stored + 1] = 1
end
return stored
"""

# KEYS: claim. ARGV: claimant, new value or '' to keep it, ms. Only the claim's owner may touch it.
_IF_OWNER = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def cache_key(provider: str, request: ProviderRequest, base_url: str | None = None) -> str:
    """``base_url``: the server the provider's client posts to (None for the offline fake), so that two
    OpenAI-compatible servers, or two tenants' endpoints, sharing one Redis never answer for each other."""
    server = base_url.rstrip("/") if base_url else None
    digest = stable_hash(
        provider,
        server,
        request.model,
        request.system,
        request.prompt,
        request.max_tokens,
        request.temperature,
        dict(request.params),
        request.json_schema,
    )
    return "cache:{" + digest + "}"  # the hash tag keeps answer and claim in one Redis Cluster slot


def _claim_key(key: str) -> str:
    return key + ":asking"


class ResponseCache:
    def __init__(
        self,
        client: aioredis.Redis,
        ttl_seconds: int | None = None,
        *,
        claimant: str | None = None,
        claim_seconds: float = 30.0,
        failed_seconds: float = 60.0,
        reads: RedisBatcher | None = None,
        writes: RedisBatcher | None = None,
    ) -> None:
        """``claimant`` names who asks (a chunk: when RQ runs it again it owns its claims again). A claim lapses
        ``claim_seconds`` after its owner stopped renewing it; a failed mark after ``failed_seconds``.
        ``reads`` / ``writes``: the process's shared batchers (lookups; answers stored)."""
        self._client = client
        self._reads = reads or RedisBatcher(client, transaction=False)
        self._writes = writes or RedisBatcher(client, transaction=True)
        self._ttl = ttl_seconds
        self._claim_ms = int(claim_seconds * 1000)
        self._failed_ms = int(failed_seconds * 1000)
        self._claimant = claimant or uuid.uuid4().hex
        self._if_owner = client.register_script(_IF_OWNER)
        self._held: dict[str, int] = {}  # claims this claimant holds while their calls run -> how many calls
        self._renewal: asyncio.TimerHandle | None = None
        self._renewing: set[asyncio.Future[None]] = set()

    async def get_or_claim(self, key: str) -> tuple[int, ProviderResponse | None]:
        """(HIT, answer); (ASK, None): the prompt is now claimed by you; (WAIT, None): someone else is asking;
        (ALONE, None): a call for it failed a moment ago, ask for yourself without a claim."""
        verdict, raw = await self._reads.stage_item(_stage_lookups, (key, self._claimant, self._claim_ms))
        verdict = int(verdict)
        if verdict < 0:
            raise redis.exceptions.ResponseError(raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))
        return verdict, (_decode(raw) if verdict == HIT else None)

    def holding(self, key: str) -> _Holding:
        """``async with``: keep renewing this claimant's claim on ``key`` while the call for it runs."""
        return _Holding(self, key)

    def _hold(self, key: str) -> None:
        self._held[key] = self._held.get(key, 0) + 1
        if self._renewal is None:
            self._renewal = asyncio.get_running_loop().call_later(self._claim_ms / 3000, self._renew_held)

    def _release(self, key: str) -> None:
        left = self._held.pop(key) - 1
        if left:
            self._held[key] = left
        elif not self._held and self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None

    def _renew_held(self) -> None:
        """Every third of a claim's life while any is held: renew them all in one round trip. One timer for the
        whole chunk rather than a task per call, which cost more CPU than the cache lookup itself."""
        keys = list(self._held)
        task = asyncio.ensure_future(self._renew(keys))
        self._renewing.add(task)
        task.add_done_callback(self._renewed)
        self._renewal = asyncio.get_running_loop().call_later(self._claim_ms / 3000, self._renew_held)

    async def _renew(self, keys: list[str]) -> None:
        def stage(pipe: Any) -> None:
            for key in keys:
                stage_script(pipe, self._if_owner, [_claim_key(key)], [self._claimant, "", self._claim_ms])

        await self._writes.run(stage)

    def _renewed(self, task: asyncio.Future[None]) -> None:
        self._renewing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the claims may lapse: others may ask too
            log.warning("renewing %s's cache claims failed: %s", self._claimant, task.exception())

    async def put(self, key: str, response: ProviderResponse) -> None:
        """Store the answer (and drop the claim on it), and wait until it is stored."""
        await self.store(key, response)

    def store(self, key: str, response: ProviderResponse) -> asyncio.Future[Any]:
        """Store the answer without waiting: it goes with the process's next batch of writes, which is the one
        that carries the row's hand-over when the row hands over next, in the same loop tick. Done when the answer is
        in Redis; a failure is logged: the answer then is not cached, and the claim on it lapses."""
        future = self._writes.stage_item(_stage_stores, (key, self._ttl or 0, _encode(response)))
        future.add_done_callback(_log_failed_store)
        return future

    async def failed(self, key: str) -> None:
        """This claimant's call failed: mark the prompt so that those waiting ask for themselves."""
        await self._if_owner(keys=[_claim_key(key)], args=[self._claimant, FAILED_MARK, self._failed_ms])


class _Holding:
    __slots__ = ("_cache", "_key")

    def __init__(self, cache: ResponseCache, key: str) -> None:
        self._cache, self._key = cache, key

    async def __aenter__(self) -> None:
        self._cache._hold(self._key)

    async def __aexit__(self, *_: object) -> None:
        self._cache._release(self._key)


def _stage_lookups(pipe: Any, lookups: list[tuple[str, str, int]]) -> None:
    """One script for the lookups of a flush: (key, claimant, claim ms) each."""
    keys: list[str] = []
    args: list[str | int] = []
    for key, claimant, claim_ms in lookups:
        keys += (key, _claim_key(key))
        args += (claimant, claim_ms)
    pipe.eval(_LOOKUP, len(keys), *keys, *args)


def _stage_stores(pipe: Any, stores: list[tuple[str, int, bytes]]) -> None:
    """One script for the answers a flush stores: (key, seconds to keep or 0, encoded answer) each; whoever
    claimed a prompt, its claim goes: the answer is there now."""
    keys: list[str] = []
    args: list[bytes | int] = []
    for key, ttl, text in stores:
        keys += (key, _claim_key(key))
        args += (ttl, text)
    pipe.eval(_STORE, len(keys), *keys, *args)


def _log_failed_store(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("an answer was not cached: %s", future.exception())


def _encode(response: ProviderResponse) -> bytes:
    """UTF-8 JSON by orjson; what it refuses (text that is not valid Unicode) ASCII-escaped by the json module."""
    data = {
        "text": response.text,
        "input_tokens": response.input_tokens,
        "output_tokens": response.output_tokens,
        "model": response.model,
    }
    try:
        return orjson.dumps(data)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(data).encode()


def _decode(raw: bytes | str) -> ProviderResponse:
    try:
        data: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:  # what orjson refuses and json reads (an escaped lone surrogate)
        data = json.loads(raw)
    return ProviderResponse(
        text=data["text"], input_tokens=data["input_tokens"], output_tokens=data["output_tokens"], model=data["model"]
    )
