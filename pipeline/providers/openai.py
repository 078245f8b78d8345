"""OpenAI Chat Completions, and any OpenAI-compatible server (vLLM, Ollama, LM Studio) through ``base_url``."""
from __future__ import annotations

import json
from typing import Any

import httpx2
import openai

from .base import ProviderRequest, ProviderResponse, rate_limit_state
from .sdk_errors import translate


class OpenAIProvider:
    """One AsyncOpenAI client per worker process; the SDK's own retries are off so ours are the only loop."""

    def __init__(self, *, name: str, api_key: str, base_url: str | None, timeout: float) -> None:
        self.name = name
        # aiohttp as the transport: httpx's pool scans every connection per request, which costs more CPU
        # than the call itself once a hundred calls are in flight.
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0,
                                          http_client=openai.DefaultAioHttpClient(timeout=timeout))

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        try:
            # The client's own post (auth, base URL, headers, error classes) without its typed model layer:
            # building and validating the pydantic models cost more CPU than the rest of a call.
            raw = await self._client.post("/chat/completions", body=self._arguments(request),
                                          cast_to=httpx2.Response)
            completion = json.loads(raw.content)
            usage = completion.get("usage") or {}
            return ProviderResponse(
                text=completion["choices"][0]["message"].get("content") or "",
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                model=completion.get("model") or request.model,
                rate_limit=rate_limit_state(raw.headers, style="openai"),
            )
        except Exception as exc:  # every failure, an odd response shape included, leaves as a typed error
            raise translate(exc, openai, self.name) from None

    @staticmethod
    def _arguments(request: ProviderRequest) -> dict[str, Any]:
        messages = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        args: dict[str, Any] = {"model": request.model, "messages": messages, "max_tokens": request.max_tokens}
        if request.temperature is not None:
            args["temperature"] = request.temperature
        if request.json_schema is not None:
            args["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": json.loads(json.dumps(request.json_schema))},
            }
        args.update(request.params)
        if "max_completion_tokens" in request.params:  # newer models take only this one
            args.pop("max_tokens", None)
        return args

    async def aclose(self) -> None:
        await self._client.close()
