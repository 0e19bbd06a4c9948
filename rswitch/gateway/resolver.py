"""Where a request goes: the combinations index and the resolution order.

`metadata.combination_id` → `metadata.template_id` → `model` equal to a combination id →
`model` equal to a template id → `model` equal to a model the gateway serves (a combination's
model, or one listed under a provider's `models`): *pass-through*, the model with no template →
no `model`: balance over every enabled combination. Anything else is a 400 naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.errors import GatewayError
from rswitch.providers.base import Provider
from rswitch.routing.base import Chain, Query
from rswitch.templates import TemplateRegistry

# The dataset of pass-through calls (a model asked for by name, no template). Template ids
# must start with a letter or digit, so no registered template can take this one.
PASSTHROUGH = "_passthrough"


@dataclass
class Route:
    """Where a request goes: candidates in order, and why (the router chain's explanation)."""

    candidates: list[Combination]
    pool_key: str
    explanation: str | None = None
    learner: Any = None  # the routing step that decided, if it learns from outcomes (a bandit)
    query: Query | None = None


class Resolver:
    """The enabled combinations indexed by template and model, and the resolution order."""

    def __init__(
        self,
        registry: TemplateRegistry,
        balancer: Balancer,
        providers: dict[str, Provider],
        combinations: list[Combination],
        chains: tuple[Chain | None, dict[str, Chain]] = (None, {}),
    ) -> None:
        self.registry = registry
        self.balancer = balancer
        self.providers = providers
        self.default_chain, self.template_chains = chains
        self.routing_enabled = self.default_chain is not None or bool(self.template_chains)
        self.combinations: dict[str, Combination] = {}
        # combinations rswitch made itself: pass-through pools and templates' default models
        self.implicit: dict[str, Combination] = {}
        self.version = 0
        self.set_combinations(combinations)

    # -- the index ------------------------------------------------------------------------

    def set_combinations(self, combinations: list[Combination]) -> None:
        self.combinations = {c.id: c for c in combinations}
        self.reindex()

    def reindex(self) -> None:
        """Rebuild lookup tables; call after changing a combination's enabled/weight."""
        enabled = [c for c in self.combinations.values() if c.enabled]
        self.enabled = enabled
        self.by_template: dict[str, list[Combination]] = {}
        served: dict[str, list[str]] = {}  # model -> providers that serve it, in config order
        for c in enabled:
            self.by_template.setdefault(c.template_id, []).append(c)
        for c in self.combinations.values():  # a disabled combination's model is still served
            if c.provider not in served.setdefault(c.model, []):
                served[c.model].append(c.provider)
        for name, provider in self.providers.items():
            if provider.type == "encoder":
                continue  # embeddings only
            for model in getattr(provider.settings, "models", None) or ():
                if name not in served.setdefault(model, []):
                    served[model].append(name)
        self.passthrough: dict[str, list[Combination]] = {
            model: [
                Combination(
                    id=f"{provider}/{model}",
                    name=f"{model} (pass-through)",
                    template_id=PASSTHROUGH,
                    model=model,
                    provider=provider,
                    implicit=True,
                )
                for provider in providers
            ]
            for model, providers in served.items()
        }
        for pool in self.passthrough.values():
            for c in pool:
                self.implicit[c.id] = c
        self.version += 1

    def effective_weights(self, fresh: bool = False) -> dict[str, float]:
        return self.balancer.effective_weights(self.combinations, self.version, fresh)

    def served_models(self) -> list[str]:
        return list(self.passthrough)

    # -- pools --------------------------------------------------------------------------------

    def template_pool(self, template_id: str) -> list[Combination]:
        pool = self.by_template.get(template_id)
        if pool:
            return pool
        tpl = self.registry.get(template_id)
        if tpl is None:
            raise GatewayError(
                400,
                f"unknown template id '{template_id}'",
                code="unknown_template",
                param="metadata.template_id",
            )
        if tpl.default_model and tpl.default_provider in self.providers:
            # a registered template with a default model and provider is servable on its own
            cid = f"{template_id}@default"
            combo = self.implicit.get(cid)
            if combo is None or (combo.model, combo.provider) != (tpl.default_model, tpl.default_provider):
                combo = self.implicit[cid] = Combination(
                    id=cid,
                    name=f"{template_id} (default model)",
                    template_id=template_id,
                    model=tpl.default_model,
                    provider=tpl.default_provider,
                    implicit=True,
                )
            return [combo]
        raise GatewayError(
            400,
            f"template '{template_id}' has no enabled combination (add one under gateway.combinations, "
            f"or register it with --default-model and --default-provider)",
            code="no_combination",
        )

    def named_combination(self, cid: Any) -> Combination:
        combo = self.combinations.get(str(cid))
        if combo is None:
            raise GatewayError(
                400,
                f"unknown combination id '{cid}'",
                code="unknown_combination",
                param="metadata.combination_id",
            )
        return combo

    def _unknown_model(self, model: str) -> GatewayError:
        served = self.served_models()
        hint = ", ".join(served[:8]) + (" …" if len(served) > 8 else "") if served else "none"
        return GatewayError(
            400,
            f"unknown model '{model}': name a template, a combination or a served model "
            f"(served models: {hint}; GET /v1/models lists them all)",
            code="unknown_model",
            param="model",
        )

    # -- resolution ------------------------------------------------------------------------------

    async def resolve(self, model: str | None, metadata: dict[str, Any], query: Query | None = None) -> Route:
        cid = metadata.get("combination_id")
        tid = metadata.get("template_id")
        pinned = routable = False
        if cid is not None:
            combo = self.named_combination(cid)
            if not combo.enabled:
                raise GatewayError(
                    400,
                    f"combination '{cid}' is disabled",
                    code="combination_disabled",
                    param="metadata.combination_id",
                )
            pool, key, pinned = [combo], f"c:{cid}", True
        elif tid is not None:
            pool, key, routable = self.template_pool(str(tid)), f"t:{tid}", True
        elif model and model in self.combinations and self.combinations[model].enabled:
            pool, key, pinned = [self.combinations[model]], f"c:{model}", True
        elif model and (model in self.by_template or self.registry.get(model) is not None):
            pool, key, routable = self.template_pool(model), f"t:{model}", True
        elif model and model in self.passthrough:
            pool, key = self.passthrough[model], f"m:{model}"
        elif model and model in self.combinations:
            raise GatewayError(
                400, f"combination '{model}' is disabled", code="combination_disabled", param="model"
            )
        elif model:
            raise self._unknown_model(model)
        else:
            pool, key, routable = self.enabled, "*", True
        if not pool:
            raise GatewayError(
                503,
                "no enabled combinations are configured",
                error_type="service_unavailable",
                code="no_combination",
            )
        explanation, learner = None, None
        if routable and query is not None:
            chain = self.template_chains.get(key[2:]) if key.startswith("t:") else None
            chain = chain or self.default_chain
            if chain is not None:
                outcome = await chain.route(query)
                explanation = outcome.explain()
                if outcome.decision is not None:
                    step = next((st for st in chain.steps if st.name == outcome.decision.step), None)
                    learner = step if hasattr(step, "observe") else None
                    chosen = [
                        self.combinations[c] for c in outcome.decision.combinations if c in self.combinations
                    ]
                    chosen = [c for c in chosen if c.enabled]
                    if chosen and outcome.decision.ranked:  # tried in the step's order, then the rest
                        eff = self.effective_weights()
                        candidates = self.balancer.order_ranked(chosen, pool, self.combinations, eff)
                        return Route(candidates, key, explanation, learner, query)
                    if chosen:  # the balancer and fallbacks still apply inside the chosen set
                        pool, key = chosen, f"{key}|{outcome.decision.target}"
        eff = self.effective_weights()
        first = self.balancer.pick(key, pool, eff)
        return Route(
            self.balancer.order(first, pool, self.combinations, eff, pinned), key, explanation, learner, query
        )
