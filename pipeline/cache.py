"""Response cache in Redis, keyed by everything that changes the answer, with a claim per prompt being asked.

Lives in Redis, not SQL, because workers never talk to the database (the collector is its only writer).
A cache miss claims the prompt in the same round trip, so a worker that meets a prompt another worker is
asking right now waits for that answer instead of paying for it again; storing the answer drops the claim.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

import redis.asyncio as aioredis

from .providers.base import ProviderRequest, ProviderResponse
from .records import stable_hash

# KEYS: answer, claim. ARGV: claimant, claim ms. Returns {1, answer} | {0, ""}: yours to ask | {2, ""}: being asked.
# A claimant that finds its own claim (its chunk is running again after a crash) takes it back.
_LOOKUP = """
local answer = redis.call('GET', KEYS[1])
if answer then return {1, answer} end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return {0, ''}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, ''} end
return {2, ''}
"""

HIT, ASK, WAIT = 1, 0, 2  # what get_or_claim found


def cache_key(provider: str, request: ProviderRequest) -> str:
    digest = stable_hash(
        provider, request.model, request.system, request.prompt, request.max_tokens, request.temperature,
        dict(request.params), request.json_schema,
    )
    return "cache:{" + digest + "}"  # the hash tag keeps answer and claim in one Redis Cluster slot


def _claim_key(key: str) -> str:
    return key + ":asking"


class ResponseCache:
    def __init__(self, client: aioredis.Redis, ttl_seconds: int | None = None, *, claimant: str | None = None,
                 claim_seconds: float = 600.0) -> None:
        """``claimant`` names who asks (a chunk: when RQ runs it again it owns its claims again);
        ``claim_seconds`` bounds how long others wait on a claim whose owner died and never came back."""
        self._client = client
        self._ttl = ttl_seconds
        self._claim_ms = int(claim_seconds * 1000)
        self._claimant = claimant or uuid.uuid4().hex
        self._lookup = client.register_script(_LOOKUP)

    async def get_or_claim(self, key: str) -> tuple[int, ProviderResponse | None]:
        """(HIT, answer), (ASK, None): nobody is asking, now you are, or (WAIT, None): someone else is asking."""
        verdict, raw = await self._lookup(keys=[key, _claim_key(key)], args=[self._claimant, self._claim_ms])
        verdict = int(verdict)
        return verdict, (_decode(raw) if verdict == HIT else None)

    async def put(self, key: str, response: ProviderResponse) -> None:
        data = {"text": response.text, "input_tokens": response.input_tokens,
                "output_tokens": response.output_tokens, "model": response.model}
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(key, json.dumps(data, ensure_ascii=False), ex=self._ttl)
            pipe.delete(_claim_key(key))
            await pipe.execute()

    async def release(self, key: str) -> None:
        """Drop a claim without an answer (the call failed): the next one to look asks for itself."""
        await self._client.delete(_claim_key(key))


def _decode(raw: bytes | str) -> ProviderResponse:
    data: dict[str, Any] = json.loads(raw)
    return ProviderResponse(text=data["text"], input_tokens=data["input_tokens"], output_tokens=data["output_tokens"],
                            model=data["model"])
