"""Prices in USD per million tokens, per model; users extend or override them with PRICE_FILE (JSON or TOML)."""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Price:
    input_per_million: float
    output_per_million: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1_000_000


BUILT_IN: dict[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5": Price(1.25, 10.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-opus-4": Price(15.00, 75.00),
    "fake": Price(0.50, 1.50),  # so that the offline demo shows cost accounting at work
}
FREE = Price(0.0, 0.0)


class PriceTable:
    """Looks a model up by exact name, then by the longest known prefix (``gpt-4o-mini-2024-07-18``)."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self._prices = dict(prices)

    @classmethod
    def load(cls, extra_file: Path | None = None) -> "PriceTable":
        prices = dict(BUILT_IN)
        if extra_file is not None:
            prices.update(_read_price_file(extra_file))
        return cls(prices)

    def price(self, model: str) -> Price:
        if model in self._prices:
            return self._prices[model]
        matches = [name for name in self._prices if model.startswith(name)]
        return self._prices[max(matches, key=len)] if matches else FREE

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> float:
        return self.price(model).cost(input_tokens, output_tokens)


def _read_price_file(path: Path) -> dict[str, Price]:
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return {name: Price(float(p["input"]), float(p["output"])) for name, p in data.items()}
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable price file ({exc}); expected {{model: {{input: X, output: Y}}}}")
