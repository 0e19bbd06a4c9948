"""Cost from token counts: an offline price table shipped in the package, overridable in config."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

# An upstream that reports no usage gets an estimate of ~4 characters per token (the
# usual rule of thumb for English BPE vocabularies). tiktoken would be closer for OpenAI
# models, but it downloads its vocabularies at run time, which self-hosted boxes often cannot.
CHARS_PER_TOKEN = 4


@lru_cache(maxsize=1)
def shipped_prices() -> dict[str, tuple[float, float]]:
    data = json.loads(resources.files("rswitch.providers").joinpath("pricing.json").read_text())
    return {k: (float(v[0]), float(v[1])) for k, v in data.items() if not k.startswith("_")}


class PriceTable:
    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        self.prices = dict(shipped_prices())
        for model, p in (overrides or {}).items():
            self.prices[model] = (float(p.input), float(p.output))
        self._by_length = sorted(self.prices, key=len, reverse=True)
        self._cache: dict[str, tuple[float, float] | None] = {}

    def lookup(self, model: str) -> tuple[float, float] | None:
        if model in self._cache:
            return self._cache[model]
        price = self.prices.get(model)
        if price is None:
            bare = model.split("/")[-1]  # "openai/gpt-4o" style names
            price = self.prices.get(bare)
            if price is None:
                price = next((self.prices[k] for k in self._by_length if bare.startswith(k)), None)
        self._cache[model] = price
        return price

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.lookup(model)
        if price is None:
            return 0.0
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


def estimate_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN)) if text else 0


def message_text(messages: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p.get("text", "") for p in c if isinstance(p, dict))
    return "\n".join(parts)
