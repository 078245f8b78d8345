"""Anthropic Messages through the official SDK."""

from __future__ import annotations

from typing import Any

import anthropic

from .base import ProviderRequest, ProviderResponse, rate_limit_state, usage_counts
from .sdk_errors import translate
from .wire import SdkWire


class AnthropicProvider:
    def __init__(self, *, api_key: str, base_url: str | None, timeout: float) -> None:
        self.name = "anthropic"
        client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)
        self.base_url = str(client.base_url)  # as the SDK resolved it: in the cache key
        self._wire = SdkWire(client, anthropic, timeout=timeout)
        self.deadline = self._wire.deadline  # no call outlives it (see RowAnswerer._complete)

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        try:
            message, headers = await self._wire.post_json("/v1/messages", self._arguments(request))
            input_tokens, output_tokens, reported = usage_counts(message.get("usage"), "input_tokens", "output_tokens")
            return ProviderResponse(
                text="".join(block["text"] for block in message["content"] if block.get("type") == "text"),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                model=message.get("model") or request.model,
                rate_limit=rate_limit_state(headers, style="anthropic"),
                usage_reported=reported,
            )
        except Exception as exc:  # every failure, an odd response shape included, leaves as a typed error
            raise translate(exc, anthropic, self.name) from None

    @staticmethod
    def _arguments(request: ProviderRequest) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": [{"role": "user", "content": request.prompt}],
        }
        if request.system:
            args["system"] = request.system
        if request.temperature is not None:
            args["temperature"] = request.temperature
        args.update(request.params)
        return args

    async def aclose(self) -> None:
        await self._wire.aclose()
