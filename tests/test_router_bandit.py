"""The bandit step: the reward, each policy on seeded simulations (convergence, drift, probing),
LinUCB on a toy contextual problem, persistence, and the step's decisions."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

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
from rswitch.routing.base import Chain, Decision, Query

ARMS = ["a", "b", "c"]


def simulate(policy, phases, *, seed=0, beta=False) -> list[str]:
    """Pull arms for each (steps, mean reward per arm) phase; rewards are Bernoulli(mean), or
    Beta with that mean (fractional, like real rewards) when `beta`. Returns the picks."""
    rng, env = random.Random(seed), random.Random(seed + 1)
    picks = []
    for steps, means in phases:
        for _ in range(steps):
            arm = policy.select(ARMS, rng)
            m = means[ARMS.index(arm)]
            policy.update(arm, env.betavariate(10 * m, 10 * (1 - m)) if beta else float(env.random() < m))
            picks.append(arm)
    return picks


def recovery(picks: list[str], start: int, best: str, window: int = 100, share: float = 0.7) -> int:
    """Pulls after `start` until `best` gets `share` of the next `window` picks (len - start: never)."""
    for t in range(start, len(picks) - window + 1):
        if picks[t : t + window].count(best) >= share * window:
            return t - start
    return len(picks) - start


def query(text: str = "hello") -> Query:
    return Query([{"role": "user", "content": text}])


# -- reward -------------------------------------------------------------------------------------


def test_reward_formula_on_fixed_inputs():
    w = BanditWeights()  # success .4, quality .4, cost .1, latency .1; $0.01, 10 s
    assert reward(True, None, 0.0, 0.0, w) == pytest.approx(1.0)
    # a failure earns nothing, however cheap and fast
    assert reward(False, 0.9, 0.0, 0.0, w) == 0.0
    # half the cost scale, a quarter of the latency scale: .4 + .4*.5 + .1*.5 + .1*.75
    assert reward(True, 0.5, 0.005, 2500, w) == pytest.approx(0.725)
    # cost and latency penalties saturate; no quality signal counts as full quality
    assert reward(True, None, 5.0, 1e6, w) == pytest.approx(0.8)
    # quality is clamped to [0, 1]
    assert reward(True, 1.7, 0.0, 0.0, w) == pytest.approx(1.0)
    assert reward(True, -1, 0.0, 0.0, w) == pytest.approx(0.6)
    # only the ratios of the weights matter: (1 + 1 * (1 - .01/.02)) / 2
    custom = BanditWeights(success=1, quality=0, cost=1, latency=0, cost_scale=0.02)
    assert reward(True, 0.1, 0.01, 99_999, custom) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        BanditWeights(success=0, quality=0, cost=0, latency=0)
    with pytest.raises(ValueError):
        BanditWeights(cost_scale=0)


# -- policies on simulations --------------------------------------------------------------------

POLICIES = {
    "epsilon-greedy": lambda: EpsilonGreedy(0.1),
    "ucb1": lambda: UCB1(),
    "thompson": lambda: ThompsonSampling(),
    "ucb1/window": lambda: SlidingWindow(UCB1(0.5), 200),
    "thompson/window": lambda: SlidingWindow(ThompsonSampling(), 200),
    "ucb1/discount": lambda: Discounted(UCB1(0.5), 0.99),
    "thompson/discount": lambda: Discounted(ThompsonSampling(), 0.99),
}


@pytest.mark.parametrize("beta", [False, True], ids=["bernoulli", "beta"])
@pytest.mark.parametrize("make", POLICIES.values(), ids=POLICIES.keys())
def test_each_policy_converges_to_the_best_arm(make, beta):
    picks = simulate(make(), [(2000, [0.2, 0.5, 0.8])], beta=beta)
    assert picks.count("c") / len(picks) > 0.8


def test_unpulled_arms_are_tried_first():
    for make in POLICIES.values():
        policy = make()
        rng = random.Random(0)
        first = []
        for _ in ARMS:
            arm = policy.select(ARMS, rng)
            policy.update(arm, 1.0)  # even a perfect reward does not skip the untried arms
            first.append(arm)
        assert first == ARMS


def test_epsilon_greedy_keeps_probing_every_arm():
    picks = simulate(EpsilonGreedy(0.1), [(2000, [0.2, 0.5, 0.8])])
    late = picks[1000:]  # long after the best arm is known
    # exploration is 10%, spread over 3 arms: each arm about 3% of the traffic
    assert all(late.count(a) >= 15 for a in ARMS)
    assert late.count("c") > 850


# the best arm (c) degrades at half-time (b is then best) and comes back later
DRIFT = [(2000, [0.3, 0.5, 0.8]), (1000, [0.3, 0.5, 0.2]), (1000, [0.3, 0.5, 0.8])]


@pytest.mark.parametrize("base", [lambda: UCB1(0.5), ThompsonSampling], ids=["ucb1", "thompson"])
def test_forgetting_variants_follow_drift_and_plain_statistics_do_not(base):
    plain = simulate(base(), DRIFT)
    window = simulate(SlidingWindow(base(), 200), DRIFT)
    discounted = simulate(Discounted(base(), 0.99), DRIFT)
    # pulls after the change until b has 70% of the next 100 picks
    recovered = {
        "window": recovery(window[:3000], 2000, "b"),
        "discounted": recovery(discounted[:3000], 2000, "b"),
    }
    never = recovery(plain[:3000], 2000, "b")
    print(f"recovery after the change: {recovered}, plain: {never}")
    assert max(recovered.values()) <= 250
    assert never >= 3 * max(recovered.values())
    # the degraded arm lost its traffic in the forgetting variants, not in the plain policy
    assert window[2500:3000].count("c") < 100 and discounted[2500:3000].count("c") < 100
    assert plain[2500:3000].count("c") > 300
    # c was still probed now and then, so when it recovers it wins its traffic back
    for picks in (window, discounted):
        assert recovery(picks, 3000, "c") <= 150


# -- LinUCB -------------------------------------------------------------------------------------


def test_linucb_picks_by_context():
    # context (bias, is_code): "coder" is good at code, "chat" at everything else
    def mean(arm: str, code: bool) -> float:
        return {("coder", True): 0.9, ("coder", False): 0.3, ("chat", True): 0.2, ("chat", False): 0.7}[
            (arm, code)
        ]

    policy = LinUCB(alpha=1.0, dim=2)
    rng, env = random.Random(0), random.Random(1)
    arms = ["chat", "coder"]
    right = 0
    for _ in range(400):
        code = env.random() < 0.5
        x = np.array([1.0, float(code)])
        arm = policy.select(arms, rng, x)
        right += (arm == "coder") == code
        policy.update(arm, float(env.random() < mean(arm, code)), x)
    assert right > 0.9 * 400  # learnt while routing, not only at the end
    assert policy.select(arms, rng, np.array([1.0, 1.0])) == "coder"
    assert policy.select(arms, rng, np.array([1.0, 0.0])) == "chat"
    with pytest.raises(ValueError):
        policy.select(arms, rng, np.array([1.0, 0.0, 0.0]))


async def test_contextual_step_routes_by_query_features():
    step = BanditStep(
        "ctx",
        ["chat", "coder"],
        LinUCB(alpha=1.0, dim=2),
        BanditWeights(success=0, quality=1, cost=0, latency=0),  # the reward is the quality
        rng=random.Random(0),
        features=lambda q: np.array([1.0, float("```" in q.text)]),
    )
    code, prose = query("fix this ```x = 1```"), query("write a haiku about rain")
    for _ in range(50):
        for q in (code, prose):
            arm = (await step.decide(q)).combinations[0]
            good = (arm == "coder") == (q is code)
            step.observe(arm, True, 1.0 if good else 0.2, context=step.features(q))
    assert (await step.decide(code)).target == "combination:coder"
    decision = await step.decide(prose)
    assert decision.target == "combination:chat"
    assert re.fullmatch(r"linucb pick chat \(estimate 0\.\d\d, n=\d+\); then coder", decision.reason)
    with pytest.raises(ValueError, match="context"):
        step.observe("chat", True)


# -- the step -----------------------------------------------------------------------------------


async def test_decide_returns_an_explained_decision():
    step = BanditStep("learned", ["a", "b"], ThompsonSampling(), rng=random.Random(0))
    assert await step.decide(query()) == Decision(
        "learned", "combination:a", ("a", "b"), "thompson pick a (untried); then b"
    )
    step.observe("a", True, 0.9)
    assert (await step.decide(query())).reason == "thompson pick b (untried); then a"
    step.observe("b", False)
    for _ in range(20):
        step.observe("a", True, 0.8)
    decision = await step.decide(query())
    # the other arms follow the pick, best estimate first: the gateway's order when it fails
    assert decision.target == "combination:a" and decision.combinations == ("a", "b")
    # rewards with default weights: quality .9 -> .96, quality .8 -> .92
    assert decision.reason == "thompson pick a (mean 0.92, n=21); then b"
    # in a chain it always decides, with its reason in the explanation
    outcome = await Chain([step]).route(query())
    assert outcome.trace == ["learned: thompson pick a (mean 0.92, n=21); then b -> combination:a"]
    # a call to a combination outside the arms (a fallback, say) teaches nothing
    assert step.observe("elsewhere", True) is None


async def test_decisions_are_deterministic_under_a_fixed_seed():
    async def run(seed: int) -> list[str]:
        step = BanditStep("b", ARMS, Discounted(ThompsonSampling(), 0.95), rng=random.Random(seed))
        env = random.Random(99)
        out = []
        for _ in range(300):
            d = await step.decide(query())
            arm = d.combinations[0]
            step.observe(arm, env.random() < {"a": 0.3, "b": 0.6, "c": 0.5}[arm], latency_ms=800)
            out.append(d.reason)
        return out

    first = await run(7)
    assert first == await run(7)
    assert first != await run(8)


# -- persistence --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: UCB1(),
        lambda: SlidingWindow(ThompsonSampling(), 50),
        lambda: Discounted(EpsilonGreedy(0.2), 0.9),
        lambda: LinUCB(dim=5),
    ],
    ids=["ucb1", "window", "discounted", "linucb"],
)
async def test_state_survives_a_restart(tmp_path: Path, make):
    path = tmp_path / "state" / "bandit.json"
    step = BanditStep("b", ARMS, make(), state_path=path, rng=random.Random(0), save_every=10)
    env = random.Random(1)
    for i in range(25):
        q = query("x " * i)
        arm = (await step.decide(q)).combinations[0]
        step.observe(arm, env.random() < 0.7, env.random(), 0.001, 500, context=step.features(q))
    await step.pending  # periodic saves are written off the event loop
    saved = json.loads(path.read_text())["policy"]  # saved at 10 and 20 updates, not since
    assert saved != step.policy.state()
    step.close()
    assert json.loads(path.read_text())["policy"] == step.policy.state()
    assert list(path.parent.iterdir()) == [path]  # the temp file was renamed into place

    again = BanditStep("b", ARMS, make(), state_path=path)
    assert again.policy.state() == step.policy.state()


def test_saves_every_n_updates_and_on_close(tmp_path: Path):
    path = tmp_path / "bandit.json"
    step = BanditStep("b", ARMS, UCB1(), state_path=path, save_every=3)
    step.observe("a", True)
    step.observe("b", True)
    assert not path.exists()
    step.observe("c", True)
    assert json.loads(path.read_text())["policy"]["arms"]["c"] == {"n": 1.0, "total": 1.0}
    step.observe("a", False)
    step.close()
    assert json.loads(path.read_text())["policy"]["arms"]["a"] == {"n": 2.0, "total": 1.0}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"policy": {"kind": "counts", "arms": {"a": {"n": 1, "total": 5}}}}',
        '{"policy": {"kind": "sliding-window", "pulls": [["a", 1.0]]}}',  # another policy's state
    ],
    ids=["garbage", "wrong-shape", "impossible-stats", "other-policy"],
)
def test_an_unusable_state_file_means_a_fresh_start_with_a_warning(tmp_path: Path, caplog, content):
    path = tmp_path / "bandit.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="rswitch.routing"):
        step = BanditStep("b", ARMS, UCB1(), state_path=path)
    assert step.policy.stats == {}
    assert "bandit step b: ignoring state" in caplog.text


async def test_a_changed_arm_set_keeps_the_known_arms(tmp_path: Path):
    path = tmp_path / "bandit.json"
    old = BanditStep("b", ["a", "b", "c"], ThompsonSampling(), state_path=path)
    for arm, ok in [("a", True), ("b", True), ("b", False), ("c", True)]:
        old.observe(arm, ok)
    old.close()

    new = BanditStep("b", ["b", "c", "d"], ThompsonSampling(), state_path=path, rng=random.Random(0))
    assert set(new.policy.stats) == {"b", "c"}  # "a" is gone, "d" starts fresh
    assert new.policy.describe("b") == "mean 0.50, n=2"
    assert (await new.decide(query())).reason == "thompson pick d (untried); then c, b"  # c served better


# -- wired into the gateway ------------------------------------------------------------------------


async def test_gateway_bandit_learns_from_routed_calls_and_keeps_its_state(make_gateway, tmp_path):
    from collections import Counter

    from tests.conftest import chat

    config = {
        "model_providers": {
            "mock": {"type": "mock"},
            "bad": {"type": "mock", "mock": {"failure_rate": 1.0, "failure_status": 500}},
        },
        "gateway": {
            "max_attempts": 1,
            "combinations": [
                {"id": "good", "template_id": "summarise", "model": "m", "provider": "mock"},
                {"id": "broken", "template_id": "summarise", "model": "m", "provider": "bad"},
            ],
        },
        "routing": {
            "default": [
                {
                    "type": "bandit",
                    "name": "learner",
                    "arms": ["broken", "good"],
                    "policy": "ucb1",
                    "drift": "window",
                    "seed": 1,
                }
            ]
        },
    }
    gw = await make_gateway(config)
    picks = Counter()
    for i in range(60):
        r = await gw.post(chat(f"q{i}", variables={"words": 3}))
        picks["good" if r.status_code == 200 else "broken"] += 1
        if r.status_code == 200:
            assert r.headers["x-rswitch-route"].startswith("learner: ucb1/window=200 pick good")
    assert picks["good"] > 45  # it learned the broken arm fails
    await gw.core.stop()
    state = tmp_path / "routing" / "bandit-learner.json"
    assert state.exists()
    again = await make_gateway(config)  # a restart: what was learned is loaded
    r = await again.post(chat("after restart", variables={"words": 3}))
    assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "good"


def test_bandit_config_errors():
    import pytest as _pytest

    from rswitch.config import ConfigError, parse_config

    with _pytest.raises(ConfigError) as exc:
        parse_config(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "gateway": {"combinations": [{"id": "a", "prompt": "x", "model": "m", "provider": "mock"}]},
                "routing": {"default": [{"type": "bandit", "arms": ["a", "ghost"], "policy": "greedy"}]},
            }
        )
    text = str(exc.value)
    assert "routing.default[0].policy" in text and "ucb1" in text
