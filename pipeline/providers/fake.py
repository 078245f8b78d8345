"""An offline provider: deterministic answers and token counts, optional latency. Lets the demo run without keys."""

from __future__ import annotations

import asyncio
import json
import math

from .base import ProviderRequest, ProviderResponse


def fake_answer(prompt: str) -> str:
    """The fake provider's answer to a prompt (tests compute the expected answer with this too)."""
    return "ECHO: " + prompt


def approx_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


class FakeProvider:
    def __init__(self, *, latency: float = 0.0) -> None:
        self.name = "fake"
        self._latency = latency

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        latency = float(request.params.get("latency", self._latency))
        if latency:
            await asyncio.sleep(latency)
        text = json.dumps({"echo": request.prompt}) if request.json_schema else fake_answer(request.prompt)
        prompt_text = (request.system or "") + request.prompt
        return ProviderResponse(
            text=text,
            input_tokens=approx_tokens(prompt_text),
            output_tokens=min(request.max_tokens, approx_tokens(text)),
            model=request.model,
        )

    async def aclose(self) -> None:
        return None
