"""The fast path: rules on token count, regex, keywords, message count, tools, images and
metadata tags. Everything expensive (regex compilation, keyword normalisation) happens once,
at start; a request costs a few comparisons."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rswitch.routing.base import Decision, Query


@dataclass
class Rule:
    index: int
    target: str
    combinations: tuple[str, ...]
    min_tokens: int | None = None
    max_tokens: int | None = None
    pattern: re.Pattern[str] | None = None
    keywords: tuple[str, ...] = ()
    min_messages: int | None = None
    max_messages: int | None = None
    has_tools: bool | None = None
    has_images: bool | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        self._checks = self._compile()

    def _compile(self) -> tuple[Callable[[Query], bool], ...]:
        """One small predicate per condition given, cheapest first: a request runs only those."""
        checks: list[Callable[[Query], bool]] = []
        if self.min_messages is not None:
            lo = self.min_messages
            checks.append(lambda q: len(q.messages) >= lo)
        if self.max_messages is not None:
            hi = self.max_messages
            checks.append(lambda q: len(q.messages) <= hi)
        if self.has_tools is not None:
            tools = self.has_tools
            checks.append(lambda q: q.has_tools == tools)
        for key, value in self.metadata:
            checks.append(lambda q, k=key, v=value: str(q.metadata.get(k)) == v)
        if self.has_images is not None:
            images = self.has_images
            checks.append(lambda q: q.has_images == images)
        if self.min_tokens is not None:
            lo_t = self.min_tokens
            checks.append(lambda q: q.tokens >= lo_t)
        if self.max_tokens is not None:
            hi_t = self.max_tokens
            checks.append(lambda q: q.tokens <= hi_t)
        if self.keywords:
            words = self.keywords
            checks.append(lambda q: any(k in q.lower_text for k in words))
        if self.pattern is not None:
            search = self.pattern.search
            checks.append(lambda q: search(q.text) is not None)
        return tuple(checks)

    def matches(self, q: Query) -> str | None:
        """The reason it matches, or None. The reason is only worked out for a match."""
        for check in self._checks:
            if not check(q):
                return None
        why: list[str] = []
        if self.min_tokens is not None or self.max_tokens is not None:
            why.append(f"tokens={q.tokens}")
        if self.keywords:
            why.append(f"keyword={next(k for k in self.keywords if k in q.lower_text)!r}")
        if self.pattern is not None:
            why.append(f"regex={self.pattern.pattern!r}")
        return ", ".join(why) or "matched"


class RulesStep:
    def __init__(self, name: str, rules: list[Rule]) -> None:
        self.name = name
        self.rules = rules

    def decide_now(self, query: Query) -> Decision | None:
        """Synchronous: the chain calls it without a coroutine round-trip (the hot path)."""
        for rule in self.rules:
            why = rule.matches(query)
            if why is not None:
                return Decision(self.name, rule.target, rule.combinations, f"rule[{rule.index}] {why}")
        return None

    async def decide(self, query: Query) -> Decision | None:
        return self.decide_now(query)


def build_rules_step(name: str, rules: list[Any], resolve_target: Any) -> RulesStep:
    """`rules` are config.RuleConfig; `resolve_target(route) -> (target, combination ids)`."""
    built = []
    for i, r in enumerate(rules):
        target, combos = resolve_target(r.route)
        built.append(
            Rule(
                index=i,
                target=target,
                combinations=combos,
                min_tokens=r.min_tokens,
                max_tokens=r.max_tokens,
                pattern=re.compile(r.regex, re.IGNORECASE) if r.regex else None,
                keywords=tuple(k.lower() for k in r.keywords),
                min_messages=r.min_messages,
                max_messages=r.max_messages,
                has_tools=r.has_tools,
                has_images=r.has_images,
                metadata=tuple((k, str(v)) for k, v in r.metadata.items()),
            )
        )
    return RulesStep(name, built)
