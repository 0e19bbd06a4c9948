"""Quality from feedback reaches the bandit: a call's reward is revised when its score arrives."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rswitch.routing.bandit import (
    UCB1,
    BanditStep,
    BanditWeights,
    Discounted,
    EpsilonGreedy,
    LinUCB,
    SlidingWindow,
    ThompsonSampling,
    reward,
)
from rswitch.routing.base import Query
from tests.conftest import chat
from tests.test_router_rules import COMBOS

W = BanditWeights()
POLICIES = {
    "epsilon": lambda: EpsilonGreedy(0.1),
    "ucb1": lambda: UCB1(),
    "thompson": ThompsonSampling,
    "window": lambda: SlidingWindow(ThompsonSampling(), 50),
    "discounted": lambda: Discounted(UCB1(), 0.9),
    "linucb": lambda: LinUCB(alpha=1.0, dim=3),
}


@pytest.mark.parametrize("kind", list(POLICIES))
def test_revised_statistics_equal_those_learned_with_the_true_quality(kind):
    """Feedback for some calls, in any order: the state ends as if their quality had been known."""
    rng = random.Random(4)
    late, known = POLICIES[kind](), POLICIES[kind]()
    step = BanditStep("b", ["a", "b"], late, W, rng=random.Random(0))
    ctx = {f"r{i}": np.array([1.0, rng.random(), rng.random()]) for i in range(80)}
    feedback = {}
    for i in range(80):
        rid, arm = f"r{i}", rng.choice(["a", "b"])
        q = rng.random()
        cost, lat = rng.random() * 0.01, rng.random() * 5000
        c = ctx[rid] if late.contextual else None
        step.observe(arm, True, None, cost, lat, context=c, request_id=rid)
        rated = i % 3 == 0  # a third of the calls get feedback; the rest keep the assumed 1
        true = reward(True, q if rated else None, cost, lat, W)
        known.update(arm, true, c) if known.contextual else known.update(arm, true)
        if rated:
            feedback[rid] = q
    for rid in sorted(feedback, key=lambda _: rng.random()):
        assert step.revise(rid, feedback[rid]) is not None
    if late.contextual:
        for arm in known.b:
            np.testing.assert_allclose(late.b[arm], known.b[arm], atol=1e-9)
    else:
        inner_late = getattr(late, "policy", late)
        inner_known = getattr(known, "policy", known)
        for arm in ("a", "b"):
            assert inner_late.get(arm).n == pytest.approx(inner_known.get(arm).n)
            assert inner_late.get(arm).total == pytest.approx(inner_known.get(arm).total)
    assert step.revise("r0", 0.0) is None  # once only


def test_failed_calls_and_unknown_ids_are_not_revised():
    step = BanditStep("b", ["a", "b"], ThompsonSampling(), W, rng=random.Random(0))
    step.observe("a", False, None, 0.0, 10, request_id="x")
    assert step.revise("x", 1.0) is None  # a failure earns 0 whatever its quality
    assert step.revise("never-seen", 0.5) is None
    assert step.policy.get("a").total == 0.0


ROUTING = {"default": [{"type": "bandit", "name": "learner", "arms": ["cheap", "strong"], "seed": 1}]}


async def test_feedback_on_answers_shifts_the_bandits_traffic(make_gateway):
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": ROUTING})
    step = gw.core.gateway.default_chain.steps[0]
    served: dict[str, list[str]] = {"cheap": [], "strong": []}
    for _ in range(30):
        r = await gw.post(chat("summarise this", variables={"words": 5}))
        served[r.headers["x-rswitch-combination"]].append(r.headers["x-rswitch-request-id"])
    assert served["cheap"] and served["strong"]
    before = step.policy.policy.get("cheap").mean
    for rid in served["cheap"]:  # users say the cheap model's answers are bad ...
        r = await gw.client.post("/v1/feedback", json={"request_id": rid, "score": 0.0})
        assert r.status_code == 202
    for rid in served["strong"]:  # ... and the strong one's are good
        await gw.client.post("/v1/feedback", json={"request_id": rid, "score": 1.0})
    after = step.policy.policy.get("cheap").mean
    assert after < before - 0.2
    picks = [
        (await step.decide(Query([{"role": "user", "content": "x"}]))).combinations[0] for _ in range(50)
    ]
    assert picks.count("strong") > 40
