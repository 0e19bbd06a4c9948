"""Build router chains from the config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rswitch.routing.base import Chain
from rswitch.routing.judge import DEFAULT_RUBRIC, Caller, JudgeStep
from rswitch.routing.rules import build_rules_step
from rswitch.routing.semantic import Embedder, SemanticRoute, SemanticStep

# (provider name, model) -> (embed function, encoder id)
EmbedderFactory = Callable[[str, str], tuple[Embedder, str]]
# (provider name, model) -> async (messages, params) -> OpenAI chat.completion dict
CallerFactory = Callable[[str, str], Caller]


def target_resolver(tiers: dict[str, list[str]]) -> Any:
    def resolve(route: str) -> tuple[str, tuple[str, ...]]:
        kind, _, name = route.partition(":") if ":" in route else ("combination", "", route)
        if kind == "tier":
            return f"tier:{name}", tuple(tiers[name])
        return f"combination:{name}", (name,)

    return resolve


def build_chains(
    routing: Any,
    embedder: EmbedderFactory | None = None,
    cache_dir: Path | None = None,
    caller: CallerFactory | None = None,
) -> tuple[Chain | None, dict[str, Chain]]:
    """(the gateway-wide chain, per-template chains) from config.RoutingConfig."""
    resolve = target_resolver(routing.tiers)

    def step(s: Any) -> Any:
        if s.type == "rules":
            return build_rules_step(s.name, s.rules, resolve)
        if s.type == "judge":
            if caller is None:
                raise ValueError(f"routing step '{s.name}' needs a model caller")
            return JudgeStep(
                s.name,
                caller(s.provider, s.model),
                hard=resolve(s.hard),
                easy=resolve(s.easy) if s.easy else None,
                threshold=s.threshold,
                rubric=s.rubric or DEFAULT_RUBRIC,
                timeout=s.timeout_seconds,
                breaker_failures=s.breaker_failures,
                breaker_cooldown=s.breaker_cooldown_seconds,
                cache_size=s.cache_size,
            )
        if embedder is None:
            raise ValueError(f"routing step '{s.name}' needs an embedder")
        embed, encoder_id = embedder(s.encoder.provider, s.encoder.model)
        routes = [SemanticRoute(*resolve(r.route), r.threshold, list(r.utterances)) for r in s.routes]
        return SemanticStep(
            s.name,
            routes,
            embed,
            encoder_id,
            top_k=s.top_k,
            aggregate=s.aggregate,
            timeout=s.timeout_seconds,
            cache_dir=cache_dir,
        )

    def chain(steps: list[Any]) -> Chain | None:
        built = [step(s) for s in steps]
        return Chain(built) if built else None

    per_template = {tid: c for tid, steps in routing.templates.items() if (c := chain(steps)) is not None}
    return chain(routing.default), per_template
