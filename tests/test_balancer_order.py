"""The order in which a request's candidates are tried: a pick or a routing step's ranking first,
then their fallbacks, then the rest of the pool (one implementation for both)."""

from __future__ import annotations

from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.metrics import LiveMetrics


def pool() -> dict[str, Combination]:
    c = [
        Combination(id="a", template_id="t", model="m", provider="p", fallbacks=["f1", "off", "ghost"]),
        Combination(id="b", template_id="t", model="m", provider="p", fallbacks=["f2", "f1"]),
        Combination(id="f1", template_id="t", model="m", provider="p"),
        Combination(id="f2", template_id="t", model="m", provider="p", fallbacks=["a"]),
        Combination(id="off", template_id="t", model="m", provider="p", enabled=False),
        Combination(id="heavy", template_id="t", model="m", provider="p"),
        Combination(id="light", template_id="t", model="m", provider="p"),
        Combination(id="other", template_id="u", model="m", provider="p"),
    ]
    return {x.id: x for x in c}


EFF = {"a": 1.0, "b": 1.0, "f1": 1.0, "f2": 1.0, "heavy": 5.0, "light": 0.5, "other": 9.0}


def ids(order: list[Combination]) -> list[str]:
    return [c.id for c in order]


def test_a_pick_is_followed_by_its_enabled_fallbacks_then_the_pool_by_weight():
    combos, bal = pool(), Balancer("round_robin", LiveMetrics())
    everything = [c for c in combos.values() if c.enabled]
    got = bal.order(combos["a"], everything, combos, EFF, pinned=False)
    # a disabled or unknown fallback is skipped; another template's combination never serves
    assert ids(got) == ["a", "f1", "heavy", "b", "f2", "light"]
    assert ids(bal.order(combos["a"], everything, combos, EFF, pinned=True)) == ["a", "f1"]


def test_a_ranking_keeps_its_order_then_each_ones_fallbacks_once_then_the_pool():
    combos, bal = pool(), Balancer("round_robin", LiveMetrics())
    everything = [c for c in combos.values() if c.enabled]
    got = bal.order_ranked([combos["b"], combos["a"]], everything, combos, EFF)
    assert ids(got) == ["b", "a", "f2", "f1", "heavy", "light"]
    # a ranking of one is ordered exactly as a pick of it
    for cid in ("a", "b", "f2"):
        one = bal.order_ranked([combos[cid]], everything, combos, EFF)
        assert ids(one) == ids(bal.order(combos[cid], everything, combos, EFF, pinned=False))
