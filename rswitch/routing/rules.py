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

    def conditions(self, env: dict[str, Any]) -> list[str]:
        """This rule's conditions as Python expressions over `q` (a Query) and `n` (its message
        count), cheapest first. Only config values go in, as literals (repr) or as objects put
        in `env` (compiled patterns): nothing from a request is ever part of the code."""
        out: list[str] = []
        if self.min_messages is not None:
            out.append(f"n >= {int(self.min_messages)}")
        if self.max_messages is not None:
            out.append(f"n <= {int(self.max_messages)}")
        if self.has_tools is not None:
            out.append(f"bool(q.params.get('tools')) is {bool(self.has_tools)}")
        for key, value in self.metadata:
            out.append(f"str(q.metadata.get({key!r})) == {value!r}")
        if self.has_images is not None:
            out.append(f"q.has_images is {bool(self.has_images)}")
        if self.min_tokens is not None:
            out.append(f"q.tokens >= {int(self.min_tokens)}")
        if self.max_tokens is not None:
            out.append(f"q.tokens <= {int(self.max_tokens)}")
        if self.keywords:
            out.append("(" + " or ".join(f"{k!r} in q.lower_text" for k in self.keywords) + ")")
        if self.pattern is not None:
            env[f"search_{self.index}"] = self.pattern.search
            out.append(f"search_{self.index}(q.text) is not None")
        return out

    def reason(self, q: Query) -> str:
        why: list[str] = []
        if self.min_tokens is not None or self.max_tokens is not None:
            why.append(f"tokens={q.tokens}")
        if self.keywords:
            why.append(f"keyword={next(k for k in self.keywords if k in q.lower_text)!r}")
        if self.pattern is not None:
            why.append(f"regex={self.pattern.pattern!r}")
        return ", ".join(why) or "matched"


def compile_rules(rules: list[Rule]) -> Callable[[Query], int]:
    """One Python function testing every rule in order, returning the first match's position
    (or -1): one call per request instead of a few per rule, which is what keeps a rules chain
    within a few percent of no routing."""
    env: dict[str, Any] = {"__builtins__": {"bool": bool, "str": str, "len": len}}
    lines = ["def first_match(q):", "    n = len(q.messages)"]
    for i, rule in enumerate(rules):
        lines.append(f"    if {' and '.join(rule.conditions(env)) or 'True'}:")
        lines.append(f"        return {i}")
    lines.append("    return -1")
    exec(compile("\n".join(lines), "<rswitch rules>", "exec"), env)  # noqa: S102 - config-built code
    return env["first_match"]


class RulesStep:
    def __init__(self, name: str, rules: list[Rule]) -> None:
        self.name = name
        self.rules = rules
        self._first_match = compile_rules(rules)

    def decide_now(self, query: Query) -> Decision | None:
        """Synchronous: the chain calls it without a coroutine round-trip (the hot path)."""
        i = self._first_match(query)
        if i < 0:
            return None
        rule = self.rules[i]
        return Decision(self.name, rule.target, rule.combinations, f"rule[{rule.index}] {rule.reason(query)}")

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
