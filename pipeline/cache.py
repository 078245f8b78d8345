"""Response cache in Redis, keyed by everything that changes the answer.

Lives in Redis, not SQL, because workers never talk to the database (the collector is its only writer).
"""
from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from .providers.base import ProviderRequest, ProviderResponse
from .records import stable_hash


def cache_key(provider: str, request: ProviderRequest) -> str:
    return "cache:" + stable_hash(
        provider, request.model, request.system, request.prompt, request.max_tokens, request.temperature,
        dict(request.params), request.json_schema,
    )


class ResponseCache:
    def __init__(self, client: aioredis.Redis, ttl_seconds: int | None = None) -> None:
        self._client = client
        self._ttl = ttl_seconds

    async def get(self, key: str) -> ProviderResponse | None:
        raw = await self._client.get(key)
        if raw is None:
            return None
        data: dict[str, Any] = json.loads(raw)
        return ProviderResponse(text=data["text"], input_tokens=data["input_tokens"],
                                output_tokens=data["output_tokens"], model=data["model"])

    async def put(self, key: str, response: ProviderResponse) -> None:
        data = {"text": response.text, "input_tokens": response.input_tokens,
                "output_tokens": response.output_tokens, "model": response.model}
        await self._client.set(key, json.dumps(data, ensure_ascii=False), ex=self._ttl)
