"""Prices in USD per million tokens, per exact model name; PRICE_FILE (JSON or TOML) adds or overrides entries.

A model that is not in the table has no price (None): never a guess from a similar name, since one family's
names are prefixes of another's (``claude-opus-4`` and ``claude-opus-4-5`` cost 15 and 5 dollars a million).
Amounts are integer nano-dollars, the unit the budget keeps in Redis and the database stores, so the two
always agree to the last unit.
"""

from __future__ import annotations

import functools
import json
import tomllib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

from pipeline.errors import ConfigError

NANO = 1_000_000_000
_NANO_PER_TOKEN = Decimal(1000)  # one USD per million tokens is 1000 nano-dollars a token


@dataclass(frozen=True)
class Price:
    input_per_million: float
    output_per_million: float

    def cost_nano(self, input_tokens: int, output_tokens: int) -> int:
        """What a call costs, in nano-dollars rounded half to even (exact decimal arithmetic, no float drift)."""
        whole = self._whole_nano_per_token
        if whole is not None:  # the usual price: integer arithmetic is exact, and has nothing to round
            return input_tokens * whole[0] + output_tokens * whole[1]
        exact = (
            input_tokens * Decimal(str(self.input_per_million)) + output_tokens * Decimal(str(self.output_per_million))
        ) * _NANO_PER_TOKEN
        return int(exact.to_integral_value(rounding=ROUND_HALF_EVEN))

    @functools.cached_property
    def _whole_nano_per_token(self) -> tuple[int, int] | None:
        """Nano-dollars a token in and out when both are whole numbers (prices with at most three decimals)."""
        per_token = [Decimal(str(p)) * _NANO_PER_TOKEN for p in (self.input_per_million, self.output_per_million)]
        if all(value == value.to_integral_value() for value in per_token):
            return int(per_token[0]), int(per_token[1])
        return None

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return self.cost_nano(input_tokens, output_tokens) / NANO


# ---------------------------------------------------------------------------------------------------------------
# THE BUILT-IN PRICE TABLE: (input, output) USD per million tokens, then every API name billed at that price
# (the model, its dated snapshots and its moving aliases). Standard (not batch, not cached-input) prices as the
# providers' pricing pages give them, last checked 2025-11. Anything else needs PRICE_FILE or --price-in/--price-out.
# ---------------------------------------------------------------------------------------------------------------
_FAMILIES: list[tuple[float, float, tuple[str, ...]]] = [
    # OpenAI
    (2.50, 10.00, ("gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20")),
    (5.00, 15.00, ("gpt-4o-2024-05-13", "chatgpt-4o-latest")),
    (0.15, 0.60, ("gpt-4o-mini", "gpt-4o-mini-2024-07-18")),
    (2.00, 8.00, ("gpt-4.1", "gpt-4.1-2025-04-14")),
    (0.40, 1.60, ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14")),
    (0.10, 0.40, ("gpt-4.1-nano", "gpt-4.1-nano-2025-04-14")),
    (2.00, 8.00, ("o3", "o3-2025-04-16")),
    (1.10, 4.40, ("o3-mini", "o3-mini-2025-01-31")),
    (1.10, 4.40, ("o4-mini", "o4-mini-2025-04-16")),
    (
        10.00,
        30.00,
        ("gpt-4-turbo", "gpt-4-turbo-2024-04-09", "gpt-4-turbo-preview", "gpt-4-0125-preview", "gpt-4-1106-preview"),
    ),
    (1.25, 10.00, ("gpt-5", "gpt-5-2025-08-07")),
    (0.25, 2.00, ("gpt-5-mini", "gpt-5-mini-2025-08-07")),
    (0.05, 0.40, ("gpt-5-nano", "gpt-5-nano-2025-08-07")),
    # Anthropic
    (3.00, 15.00, ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet-20241022", "claude-3-5-sonnet-latest")),
    (0.80, 4.00, ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest")),
    (3.00, 15.00, ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest")),
    (3.00, 15.00, ("claude-sonnet-4-20250514", "claude-sonnet-4-0")),
    (15.00, 75.00, ("claude-opus-4-20250514", "claude-opus-4-0")),
    (15.00, 75.00, ("claude-opus-4-1-20250805", "claude-opus-4-1")),
    (3.00, 15.00, ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5")),
    (1.00, 5.00, ("claude-haiku-4-5-20251001", "claude-haiku-4-5")),
    (5.00, 25.00, ("claude-opus-4-5-20251101", "claude-opus-4-5")),
    # The offline fake provider, so that the demo shows cost accounting at work
    (0.50, 1.50, ("fake",)),
]
BUILT_IN: dict[str, Price] = {name: Price(i, o) for i, o, names in _FAMILIES for name in names}


# Batch APIs bill half the online price (OpenAI Batch, Anthropic Message Batches), per provider.
BATCH_DISCOUNT: dict[str, float] = {"openai": 0.5, "anthropic": 0.5}


class PriceTable:
    """Prices by exact model name. ``price`` is None for a model nobody priced."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self._prices = dict(prices)

    @classmethod
    def load(cls, extra_file: Path | None = None) -> PriceTable:
        prices = dict(BUILT_IN)
        if extra_file is not None:
            prices.update(_read_price_file(extra_file))
        return cls(prices)

    def with_price(self, model: str, input_per_million: float | None, output_per_million: float | None) -> PriceTable:
        """This table with a run's own price for its model (``--price-in/--price-out``), if it has one."""
        if input_per_million is None or output_per_million is None:
            return self
        return PriceTable({**self._prices, model: Price(input_per_million, output_per_million)})

    def price(self, model: str) -> Price | None:
        return self._prices.get(model)

    def batch_price(self, provider: str, model: str) -> Price | None:
        """The model's price through ``provider``'s batch API (None: no price, or the provider has no batches)."""
        price, share = self._prices.get(model), BATCH_DISCOUNT.get(provider)
        if price is None or share is None:
            return None
        return Price(price.input_per_million * share, price.output_per_million * share)

    def unpriced(self, models: list[str]) -> list[str]:
        return [model for model in dict.fromkeys(models) if model not in self._prices]


def _read_price_file(path: Path) -> dict[str, Price]:
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return {name: Price(float(p["input"]), float(p["output"])) for name, p in data.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, tomllib.TOMLDecodeError) as exc:
        expected = "expected {model: {input: X, output: Y}}"
        raise ConfigError(f"{path}: unreadable price file ({exc}); {expected}") from None
