"""OpenAI Chat Completions, and any OpenAI-compatible server (vLLM, Ollama, LM Studio) through ``base_url``."""

from __future__ import annotations

import json
from typing import Any

import openai

from .base import ProviderRequest, ProviderResponse, rate_limit_state, usage_counts
from .sdk_errors import translate
from .wire import SdkWire


class OpenAIProvider:
    """One AsyncOpenAI client per worker process, posting through ``SdkWire``; our retry loop is the only one."""

    def __init__(self, *, name: str, api_key: str, base_url: str | None, timeout: float) -> None:
        self.name = name
        client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.base_url = str(client.base_url)  # as the SDK resolved it (OPENAI_BASE_URL, default): in the cache key
        self._wire = SdkWire(client, openai, timeout=timeout)
        self.deadline = self._wire.deadline  # no call outlives it (see RowAnswerer._complete)

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        try:
            completion, headers = await self._wire.post_json("/chat/completions", self._arguments(request))
            input_tokens, output_tokens, reported = usage_counts(
                completion.get("usage"), "prompt_tokens", "completion_tokens"
            )
            return ProviderResponse(
                text=completion["choices"][0]["message"].get("content") or "",
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                model=completion.get("model") or request.model,
                rate_limit=rate_limit_state(headers, style="openai"),
                usage_reported=reported,
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
        await self._wire.aclose()
