"""The router chain: steps evaluated in order; the first that decides wins; each says why."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from rswitch.providers.pricing import estimate_tokens


class Query:
    """What a routing step may look at; derived values are computed once, on first use.

    A plain class with slots rather than a dataclass with cached_property: it is built for every
    routed request, and Python 3.11's cached_property takes a lock on each first access."""

    __slots__ = ("messages", "params", "metadata", "contexts", "_text", "_lower", "_tokens", "_images")

    def __init__(
        self,
        messages: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        contexts: dict[str, Any] | None = None,
    ) -> None:
        self.messages = messages
        self.params = {} if params is None else params
        self.metadata = {} if metadata is None else metadata
        self.contexts = {} if contexts is None else contexts  # a contextual step's features, by step name
        self._text: str | None = None
        self._lower: str | None = None
        self._tokens: int | None = None
        self._images: bool | None = None

    @property
    def text(self) -> str:
        """The text of the user turns, which is what is being asked."""
        if self._text is None:
            parts: list[str] = []
            for m in self.messages:
                if m.get("role") != "user":
                    continue
                c = m.get("content")
                if isinstance(c, str):
                    parts.append(c)
                elif isinstance(c, list):
                    parts.extend(
                        p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"
                    )
            self._text = "\n".join(parts)
        return self._text

    @property
    def lower_text(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = estimate_tokens(self.text)
        return self._tokens

    @property
    def has_images(self) -> bool:
        if self._images is None:
            self._images = any(
                isinstance(m.get("content"), list)
                and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
                for m in self.messages
            )
        return self._images

    @property
    def has_tools(self) -> bool:
        return bool(self.params.get("tools"))


@dataclass(frozen=True)
class Decision:
    """Where a step sends the query: a combination or a tier, and why.

    A tier's combinations are a set the balancer picks from. A combination target that names
    more than one combination (a bandit's arms, best first) is a ranking: the gateway tries
    them in that order, then each one's fallbacks, then the rest of the pool."""

    step: str
    target: str  # "combination:ID" or "tier:NAME"
    combinations: tuple[str, ...]
    reason: str
    score: float | None = None
    threshold: float | None = None

    @property
    def ranked(self) -> bool:
        return len(self.combinations) > 1 and self.target.startswith("combination:")


class Step(Protocol):
    """Decides (a Decision), or passes: None, or a short note saying why it passed."""

    name: str

    async def decide(self, query: Query) -> Decision | str | None: ...


@dataclass
class Outcome:
    decision: Decision | None
    trace: list[str]  # one entry per step consulted
    ms: float

    def explain(self) -> str:
        """The x-rswitch-route header: each step's verdict, then the decision and its cost."""
        verdict = self.decision.target if self.decision else "balancer"
        return f"{'; '.join(self.trace)} => {verdict} ({self.ms:.3f} ms)"


class Chain:
    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps

    async def route(self, query: Query) -> Outcome:
        started = time.perf_counter()
        trace: list[str] = []
        for step in self.steps:
            now = getattr(step, "decide_now", None)  # a synchronous step needs no coroutine
            decision = now(query) if now is not None else await step.decide(query)
            if isinstance(decision, str):
                trace.append(f"{step.name}: pass ({decision})")
                continue
            if decision is not None:
                detail = (
                    f" score={decision.score:.3f}/{decision.threshold:.3f}"
                    if decision.score is not None and decision.threshold is not None
                    else ""
                )
                trace.append(f"{step.name}: {decision.reason}{detail} -> {decision.target}")
                return Outcome(decision, trace, (time.perf_counter() - started) * 1000)
            trace.append(f"{step.name}: pass")
        return Outcome(None, trace, (time.perf_counter() - started) * 1000)


def normalise(m: Any) -> Any:
    """Vectors (the last axis) scaled to unit length; a zero vector stays zero (every step that
    compares embeddings by cosine uses this one)."""
    import numpy as np

    norms = np.linalg.norm(m, axis=-1, keepdims=True)
    return m / np.where(norms == 0, 1.0, norms)
