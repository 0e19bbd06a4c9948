"""Build router chains from the config."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rswitch.providers.batching import MicroBatcher
from rswitch.routing.bandit import (
    UCB1,
    BanditStep,
    BanditWeights,
    Discounted,
    EpsilonGreedy,
    LinUCB,
    SlidingWindow,
    ThompsonSampling,
)
from rswitch.routing.base import Chain
from rswitch.routing.judge import DEFAULT_RUBRIC, Caller, JudgeStep
from rswitch.routing.learned import LearnedStep, learned_path
from rswitch.routing.rules import build_rules_step
from rswitch.routing.semantic import Embedder, SemanticRoute, SemanticStep
from rswitch.routing.trained import load_for_step

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


def build_bandit(
    s: Any, resolve: Any, state_dir: Path | None, embedder: EmbedderFactory | None = None
) -> BanditStep:
    arms: list[str] = []
    for a in s.arms:  # a tier contributes its combinations
        arms.extend(c for c in resolve(a)[1] if c not in arms)
    base: Any
    embed, context_id = None, "features"
    if s.policy == "linucb" and s.context == "embedding":
        if embedder is None:
            raise ValueError(f"routing step '{s.name}' needs an embedder")
        embed, encoder_id = embedder(s.encoder.provider, s.encoder.model)
        embed = MicroBatcher(embed).submit  # concurrent prompts share one encoder call
        context_id = f"embedding:{encoder_id}"
    if s.policy == "linucb":
        policy: Any = LinUCB(alpha=s.alpha, dim=None if embed is not None else 5)
    else:
        base = {
            "epsilon_greedy": lambda: EpsilonGreedy(s.epsilon),
            "ucb1": lambda: UCB1(s.c),
            "thompson": ThompsonSampling,
        }[s.policy]()
        policy = {
            "none": base,
            "window": SlidingWindow(base, s.window),
            "discounted": Discounted(base, s.gamma),
        }[s.drift]
    w = s.weights
    weights = BanditWeights(
        success=w.success,
        quality=w.quality,
        cost=w.cost,
        latency=w.latency,
        cost_scale=w.cost_scale,
        latency_scale_ms=w.latency_scale_ms,
    )
    state = state_dir / f"bandit-{s.name}.json" if state_dir is not None else None
    return BanditStep(
        s.name,
        arms,
        policy,
        weights,
        state,
        rng=random.Random(s.seed),
        embed=embed,
        context_id=context_id,
        embed_timeout=s.timeout_seconds,
    )


def build_learned(
    s: Any, resolve: Any, state_dir: Path | None, embedder: EmbedderFactory | None, template: str | None
) -> LearnedStep:
    arms: list[str] = []
    for a in s.arms:  # a tier contributes its combinations, in its order
        arms.extend(c for c in resolve(a)[1] if c not in arms)
    if embedder is None:
        raise ValueError(f"routing step '{s.name}' needs an embedder")
    tid = s.template or template
    if tid is None:
        raise ValueError(f"learned step '{s.name}' needs the template whose rows it learns from")
    embed, encoder_id = embedder(s.encoder.provider, s.encoder.model)
    return LearnedStep(
        s.name,
        arms,
        embed,
        encoder_id,
        learned_path(state_dir or Path("."), tid, s.name),
        template=tid,
        strong_share=s.strong_share,
        min_labels=s.min_labels,
        refit_every=s.refit.every_labels,
        check_seconds=s.refit.check_seconds,
        neighbours=s.neighbours,
        timeout=s.timeout_seconds,
    )


def build_chains(
    routing: Any,
    embedder: EmbedderFactory | None = None,
    cache_dir: Path | None = None,
    caller: CallerFactory | None = None,
) -> tuple[Chain | None, dict[str, Chain]]:
    """(the gateway-wide chain, per-template chains) from config.RoutingConfig."""
    resolve = target_resolver(routing.tiers)

    def step(s: Any, template: str | None = None) -> Any:
        if s.type == "rules":
            return build_rules_step(s.name, s.rules, resolve)
        if s.type == "bandit":
            return build_bandit(s, resolve, cache_dir, embedder)
        if s.type == "learned":
            return build_learned(s, resolve, cache_dir, embedder, template)
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
        targets = [r.target for r in routes]
        return SemanticStep(
            s.name,
            routes,
            embed,
            encoder_id,
            top_k=s.top_k,
            aggregate=s.aggregate,
            timeout=s.timeout_seconds,
            cache_dir=cache_dir,
            trained=load_for_step(s, encoder_id, targets) if s.method == "trained" else None,
        )

    def chain(steps: list[Any], template: str | None = None) -> Chain | None:
        built = [step(s, template) for s in steps]
        return Chain(built) if built else None

    per_template = {
        tid: c for tid, steps in routing.templates.items() if (c := chain(steps, tid)) is not None
    }
    return chain(routing.default), per_template
