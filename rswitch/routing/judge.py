"""The judge step: a small model rates how hard a prompt is, and hard prompts go to the
strong tier. As RouteLLM's causal-LLM router does, it reads the probability mass the model
puts on the score tokens "1"…"5" at temperature 0 and uses the expected score — not a digit
parsed from text. A timeout and a circuit breaker keep a slow or failing judge from adding
its latency to every request: the step passes instead. Verdicts are cached by prompt hash."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from rswitch.routing.base import Decision, Query

DEFAULT_RUBRIC = (
    "You rate how hard a user's request is for an AI assistant, from 1 (trivial: a greeting, a simple fact) to "
    "5 (very hard: multi-step reasoning, expert knowledge, long careful writing). Answer with one digit."
)
SCORES = ("1", "2", "3", "4", "5")
Caller = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[dict[str, Any]]]


def expected_score(resp: dict[str, Any]) -> float | None:
    """Σ p(d)·d over the score digits among the first token's top logprobs, renormalised."""
    try:
        top = resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    mass: dict[int, float] = {}
    for entry in top:
        token = str(entry.get("token", "")).strip()
        if token in SCORES:
            mass[int(token)] = mass.get(int(token), 0.0) + math.exp(float(entry["logprob"]))
    total = sum(mass.values())
    if total <= 0:
        return None
    return sum(score * p for score, p in mass.items()) / total


class JudgeStep:
    def __init__(
        self,
        name: str,
        call: Caller,
        *,
        hard: tuple[str, tuple[str, ...]],
        easy: tuple[str, tuple[str, ...]] | None,
        threshold: float = 3.0,
        rubric: str = DEFAULT_RUBRIC,
        timeout: float = 1.0,
        breaker_failures: int = 3,
        breaker_cooldown: float = 30.0,
        cache_size: int = 10_000,
    ) -> None:
        self.name = name
        self.call = call
        self.hard, self.easy = hard, easy
        self.threshold = threshold
        self.rubric = rubric
        self.timeout = timeout
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self._failures = 0
        self._open_until = 0.0
        self._cache: OrderedDict[str, float] = OrderedDict()
        self._cache_size = cache_size

    def _key(self, text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    async def score(self, text: str, timeout: float | None = None) -> float | None:
        """The judge's expected score for `text` (cached), or None without score tokens;
        raises on a failed or slow call (`timeout`, default the step's)."""
        key = self._key(text)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        messages = [{"role": "system", "content": self.rubric}, {"role": "user", "content": text[:4000]}]
        params = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            resp = await self.call(messages, params)
        value = expected_score(resp)
        if value is not None:
            self._cache[key] = value
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    async def decide(self, query: Query) -> Decision | str | None:
        if not query.text.strip():
            return None
        if time.monotonic() < self._open_until:
            return "breaker open"
        try:
            value = await self.score(query.text)
        except Exception as exc:  # timeout or upstream failure: count it, pass this request
            self._failures += 1
            if self._failures >= self.breaker_failures:
                self._open_until = time.monotonic() + self.breaker_cooldown
                self._failures = 0
            return f"judge failed: {type(exc).__name__}"
        self._failures = 0
        if value is None:
            return "no score tokens in the judge's answer"
        if value >= self.threshold:
            return Decision(self.name, self.hard[0], self.hard[1], "hard", value, self.threshold)
        if self.easy is not None:
            return Decision(self.name, self.easy[0], self.easy[1], "easy", value, self.threshold)
        return f"easy {value:.2f} < {self.threshold:.2f}"
