"""Estimated cost of usage per model family: a default price table the owner can override
(TOKEN_PRICES). Prices are US dollars per million tokens, (input, output). Pure."""

from __future__ import annotations

import re

# Public list prices of each family's usual model, per million tokens (input, output). Estimates:
# the upstream's bill is the truth.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4.5": (75.0, 150.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4": (30.0, 60.0),
    "gpt-3.5-turbo": (0.5, 1.5),
    "o-series": (2.0, 8.0),
    "embeddings": (0.02, 0.0),
    "claude-opus": (15.0, 75.0),
    "claude-sonnet": (3.0, 15.0),
    "claude-haiku": (0.8, 4.0),
}
_ITEM = re.compile(r"^\s*([A-Za-z0-9._:-]+)\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*(?:/\s*([0-9]+(?:\.[0-9]+)?))?\s*$")


def parse_prices(text: str) -> dict[str, tuple[float, float]]:
    """`family=input/output` pairs (dollars per million tokens), separated by commas; one number
    means the same price both ways. ValueError names the first unreadable item."""
    prices: dict[str, tuple[float, float]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        match = _ITEM.match(item)
        if not match:
            raise ValueError(f"cannot read {item.strip()[:40]!r}; use family=input/output, e.g. gpt-4o=2.5/10")
        price_in = float(match.group(2))
        price_out = float(match.group(3)) if match.group(3) is not None else price_in
        prices[match.group(1).lower()] = (price_in, price_out)
    return prices


def price_table(overrides: str = "") -> dict[str, tuple[float, float]]:
    return {**DEFAULT_PRICES, **parse_prices(overrides)}


def cost(prices: dict[str, tuple[float, float]], family: str, tokens_in: int, tokens_out: int) -> float | None:
    """Dollars for that usage, or None when the family has no price."""
    price = prices.get(family)
    if price is None:
        return None
    return (tokens_in * price[0] + tokens_out * price[1]) / 1_000_000
