"""Combinations and the strategies that choose among them.

- round_robin: each in turn.
- weighted_round_robin: nginx's smooth weighted round-robin — deterministic, and over any
  run of sum(weights) picks it splits exactly by weight without bunching.
- performance_based: scores each combination by the reward a bandit step would expect of its
  next call (`routing.bandit.reward` over the live window: success rate and feedback quality
  first, latency and cost as bounded tie-breakers); a share of traffic (`exploration`) still
  goes round the others so a recovered one earns its way back.

Effective weights fold in `fallback_threshold`: a combination whose windowed success rate
is below it (after `min_requests`) keeps a tenth of its weight and hands the rest to its
fallbacks; it gets it back as soon as the window shows it healthy again. With state on Redis
the window is every replica's: the others' counts (`share`, each second) add to this one's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from rswitch.gateway.metrics import LiveMetrics
from rswitch.routing.bandit import BanditWeights, reward

DEMOTED_SHARE = 0.1


@dataclass
class Combination:
    id: str
    template_id: str
    model: str
    provider: str
    name: str = ""
    weight: float = 1.0
    is_primary: bool = False
    enabled: bool = True
    fallbacks: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    implicit: bool = False  # made from a template's default model, not listed in the config


class Balancer:
    def __init__(
        self,
        strategy: str,
        metrics: LiveMetrics,
        *,
        fallback_threshold: float = 0.8,
        min_requests: int = 10,
        exploration: float = 0.1,
        seed: int | None = None,
        weights: BanditWeights = BanditWeights(),
    ) -> None:
        self.strategy = strategy
        self.weights = weights  # performance_based's reward weights (the gateway uses the bandit's defaults)
        self.metrics = metrics
        self.fallback_threshold = fallback_threshold
        self.min_requests = min_requests
        self.exploration = exploration
        self._rng = random.Random(seed)
        self._rr: dict[str, int] = {}
        self._current: dict[str, dict[str, float]] = {}  # smooth WRR state per pool
        self._eff: dict[str, float] = {}
        self._eff_at = -1.0
        self._eff_version = -1
        # the other replicas' window (attempts, successes) per combination, when state is shared
        self.elsewhere: dict[str, tuple[int, int]] = {}

    # -- health and effective weights -------------------------------------------------------

    def demoted(self, combo: Combination) -> bool:
        if self.fallback_threshold <= 0:
            return False
        w = self.metrics.window_stats(combo.id)
        requests, successes = w.requests, w.successes
        more = self.elsewhere.get(combo.id)
        if more is not None:
            requests, successes = requests + more[0], successes + more[1]
        rate = successes / requests if requests else 0.0
        return requests >= self.min_requests and rate < self.fallback_threshold

    def share(self, elsewhere: dict[str, tuple[int, int]]) -> None:
        """The other replicas' windows as of now ({} while they cannot be read): demotions are
        decided on the sum, and effective weights are recomputed on the next request."""
        self.elsewhere = elsewhere
        self._eff_at = -1.0

    def effective_weights(
        self, combos: dict[str, Combination], version: int = 0, fresh: bool = False
    ) -> dict[str, float]:
        """Weights with demotions folded in; cached briefly for the hot path, unless `fresh`."""
        now = time.monotonic()
        if not fresh and version == self._eff_version and now - self._eff_at < self.metrics.cache_seconds:
            return self._eff
        eff = {cid: (c.weight if c.enabled else 0.0) for cid, c in combos.items()}
        for cid, c in combos.items():
            if not c.enabled or not self.demoted(c):
                continue
            lost = eff[cid] * (1 - DEMOTED_SHARE)
            eff[cid] -= lost
            heirs = [
                f for f in c.fallbacks if f in combos and combos[f].enabled and not self.demoted(combos[f])
            ]
            for f in heirs:
                eff[f] += lost / len(heirs)
        self._eff, self._eff_at, self._eff_version = eff, now, version
        return eff

    # -- picking -------------------------------------------------------------------------

    def pick(self, pool_key: str, pool: list[Combination], eff: dict[str, float]) -> Combination:
        if len(pool) == 1:
            return pool[0]
        if self.strategy == "round_robin":
            return self._round_robin(pool_key, pool)
        if self.strategy == "performance_based":
            return self._performance(pool_key, pool, eff)
        return self._smooth_weighted(pool_key, pool, eff)

    def _round_robin(self, key: str, pool: list[Combination]) -> Combination:
        i = self._rr.get(key, 0)
        self._rr[key] = i + 1
        return pool[i % len(pool)]

    def _smooth_weighted(self, key: str, pool: list[Combination], eff: dict[str, float]) -> Combination:
        weights = {c.id: eff.get(c.id, c.weight) for c in pool}
        total = sum(weights.values())
        if total <= 0:
            return self._round_robin(key, pool)
        current = self._current.setdefault(key, {})
        best: Combination | None = None
        best_value = 0.0
        for c in pool:
            value = current.get(c.id, 0.0) + weights[c.id]
            current[c.id] = value
            if best is None or value > best_value:
                best, best_value = c, value
        assert best is not None
        current[best.id] -= total
        return best

    def score(self, combo: Combination) -> float:
        """The expected reward of the combination's next call, in [0, 1]: the success rate
        (Laplace-smoothed) times the bandit step's reward of a successful call with the
        window's feedback quality (smoothed towards 1: no feedback changes nothing), mean cost
        and mean latency. With the default weights success and quality carry 0.8 of it and
        latency and cost at most 0.1 each, measured against fixed scales (10 s, 1 cent), so a
        slower arm loses a few hundredths, never half its score, and better answers win."""
        w = self.metrics.window_stats(combo.id)
        if w.requests == 0:
            return 1.0  # unknown: optimistic, so it gets measured
        success = (w.successes + 1) / (w.requests + 2)
        quality = ((w.quality or 0.0) * w.quality_n + 1) / (w.quality_n + 1)
        # the reward is linear in latency and cost below their caps: at the means it is the mean reward
        latency = w.mean_ms if w.mean_ms is not None else 0.0
        return success * reward(True, quality, w.cost / w.requests, latency, self.weights)

    def _performance(self, key: str, pool: list[Combination], eff: dict[str, float]) -> Combination:
        live = [c for c in pool if eff.get(c.id, c.weight) > 0] or pool
        if self._rng.random() < self.exploration:
            return self._round_robin(key + "/explore", live)
        ranked = [
            (self.score(c) * (1.0 if not self.demoted(c) else DEMOTED_SHARE), eff.get(c.id, 0), c)
            for c in live
        ]
        best = max(r[:2] for r in ranked)
        # equals (unmeasured ones, whose stats are cached between refreshes) take turns, so a burst
        # does not all go to the first of them
        tied = [c for score, weight, c in ranked if (score, weight) == best]
        return tied[0] if len(tied) == 1 else self._round_robin(key + "/tied", tied)

    def order(
        self,
        first: Combination,
        pool: list[Combination],
        combos: dict[str, Combination],
        eff: dict[str, float],
        pinned: bool,
    ) -> list[Combination]:
        """The candidates for one request: the pick, its fallbacks, then the other combinations
        of its pool that serve the same template (best effective weight first)."""
        return self._candidates([first], pool, combos, eff, pinned)

    def order_ranked(
        self,
        ranked: list[Combination],
        pool: list[Combination],
        combos: dict[str, Combination],
        eff: dict[str, float],
    ) -> list[Combination]:
        """The candidates for a routing step's ranking (a bandit's arms, best first): the
        ranked combinations in that order, then each one's fallbacks in the same order, then
        the other combinations of the pool that serve the first one's template (best effective
        weight first). The ranking comes first because the step learned how those serve."""
        return self._candidates(ranked, pool, combos, eff, pinned=False)

    @staticmethod
    def _candidates(
        ranked: list[Combination],
        pool: list[Combination],
        combos: dict[str, Combination],
        eff: dict[str, float],
        pinned: bool,
    ) -> list[Combination]:
        """`ranked` in order, then their enabled fallbacks (each once, in the ranking's order), then,
        unless the request was pinned, the rest of the pool serving the first one's template."""
        out = list(ranked)
        seen = {c.id for c in out}
        for c in ranked:
            for fid in c.fallbacks:
                f = combos.get(fid)
                if f is not None and f.enabled and fid not in seen:
                    out.append(f)
                    seen.add(fid)
        if not pinned:
            template = ranked[0].template_id
            rest = (c for c in pool if c.id not in seen and c.template_id == template)
            out.extend(sorted(rest, key=lambda c: -eff.get(c.id, 0.0)))
        return out
