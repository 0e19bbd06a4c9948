"""The fast path: rules on token count, regex, keywords, message count, tools, images and
metadata tags. Everything expensive (regex compilation, keyword normalisation) happens once,
at start; a request costs a few comparisons."""

from __future__ import annotations

import re
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

    def matches(self, q: Query) -> str | None:
        """The reason it matches, or None. Cheap checks first."""
        why: list[str] = []
        n = len(q.messages)
        if self.min_messages is not None and n < self.min_messages:
            return None
        if self.max_messages is not None and n > self.max_messages:
            return None
        if self.has_tools is not None and q.has_tools != self.has_tools:
            return None
        for key, value in self.metadata:
            if str(q.metadata.get(key)) != value:
                return None
        if self.has_images is not None and q.has_images != self.has_images:
            return None
        if self.min_tokens is not None or self.max_tokens is not None:
            t = q.tokens
            if (self.min_tokens is not None and t < self.min_tokens) or (
                self.max_tokens is not None and t > self.max_tokens
            ):
                return None
            why.append(f"tokens={t}")
        if self.keywords:
            low = q.text.lower()
            hit = next((k for k in self.keywords if k in low), None)
            if hit is None:
                return None
            why.append(f"keyword={hit!r}")
        if self.pattern is not None:
            m = self.pattern.search(q.text)
            if m is None:
                return None
            why.append(f"regex={self.pattern.pattern!r}")
        return ", ".join(why) or "matched"


class RulesStep:
    def __init__(self, name: str, rules: list[Rule]) -> None:
        self.name = name
        self.rules = rules

    async def decide(self, query: Query) -> Decision | None:
        for rule in self.rules:
            why = rule.matches(query)
            if why is not None:
                return Decision(self.name, rule.target, rule.combinations, f"rule[{rule.index}] {why}")
        return None


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
