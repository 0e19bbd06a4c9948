"""Build router chains from the config."""

from __future__ import annotations

from typing import Any

from rswitch.routing.base import Chain
from rswitch.routing.rules import build_rules_step


def target_resolver(tiers: dict[str, list[str]]) -> Any:
    def resolve(route: str) -> tuple[str, tuple[str, ...]]:
        kind, _, name = route.partition(":") if ":" in route else ("combination", "", route)
        if kind == "tier":
            return f"tier:{name}", tuple(tiers[name])
        return f"combination:{name}", (name,)

    return resolve


def build_chains(routing: Any) -> tuple[Chain | None, dict[str, Chain]]:
    """(the gateway-wide chain, per-template chains) from config.RoutingConfig."""
    resolve = target_resolver(routing.tiers)

    def chain(steps: list[Any]) -> Chain | None:
        built = [build_rules_step(s.name, s.rules, resolve) for s in steps]
        return Chain(built) if built else None

    per_template = {tid: c for tid, steps in routing.templates.items() if (c := chain(steps)) is not None}
    return chain(routing.default), per_template
