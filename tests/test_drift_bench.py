"""The drift regret benchmark (benchmarks/routing/drift.py) on a tiny configuration: its
expected rewards are those of the gateway's reward function, and its verdicts are the ones a
reader of the table relies on."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.routing import drift
from rswitch.routing.bandit import reward

SEEDS, STEPS = 3, 600
POLICIES = ("round_robin", "performance_based", "thompson+none", "thompson+window")


@pytest.fixture(scope="module")
def result():
    return drift.run_benchmark(SEEDS, STEPS, policies=POLICIES)


@pytest.mark.parametrize("arm", [*drift.ARMS, drift.DEGRADED], ids=lambda a: a.name)
def test_expected_reward_is_the_mean_of_the_gateway_reward(arm):
    n = 20_000
    o = drift.draw_outcomes(drift.Scenario("one", (arm,), (arm,)), n, seed=7)
    sampled = statistics.fmean(
        reward(ok[0], q[0], arm.cost, ms[0]) for ok, q, ms in zip(o.ok, o.quality, o.latency_ms, strict=True)
    )
    assert drift.expected_reward(arm) == pytest.approx(sampled, abs=0.01)


def test_the_drift_turns_the_best_arm_into_the_worst():
    before = [drift.expected_reward(a) for a in drift.SCENARIOS[1].before]
    after = [drift.expected_reward(a) for a in drift.SCENARIOS[1].after]
    assert before.index(max(before)) == 0
    assert after.index(min(after)) == 0


def test_a_drift_aware_bandit_beats_round_robin_after_drift(result):
    policies = result["scenarios"]["drift"]["policies"]
    assert policies["thompson+window"]["regret_mean"] < policies["round_robin"]["regret_mean"]
    assert (
        policies["thompson+window"]["post_drift_regret_mean"]
        < policies["round_robin"]["post_drift_regret_mean"]
    )


def test_round_robin_regret_grows_linearly_and_above_a_bandits(result):
    gaps = [drift.expected_reward(drift.ARMS[0]) - drift.expected_reward(a) for a in drift.ARMS]
    linear = STEPS * statistics.fmean(gaps)  # a quarter of the traffic on each arm
    policies = result["scenarios"]["stationary"]["policies"]
    assert policies["round_robin"]["regret_mean"] == pytest.approx(linear, rel=0.02)
    assert policies["round_robin"]["best_share"] == pytest.approx(0.25)
    assert policies["thompson+none"]["regret_mean"] < policies["round_robin"]["regret_mean"]


def test_recovery_is_a_step_count_or_none(result):
    drifted = result["scenarios"]["drift"]
    assert drifted["drift_step"] == STEPS // 2
    for name, summary in drifted["policies"].items():
        steps = [r["recovery_steps"] for r in summary["runs"]]
        assert len(steps) == SEEDS
        assert all(s is None or (isinstance(s, int) and 0 < s <= STEPS // 2) for s in steps), name
        assert summary["never_recovered"] == steps.count(None)
    # round robin sends a quarter of the traffic to the new best arm, never a majority
    assert drifted["policies"]["round_robin"]["never_recovered"] == SEEDS
    assert "recovery_median" not in result["scenarios"]["stationary"]["policies"]["round_robin"]


def test_same_seeds_same_numbers_and_a_table_per_scenario(result):
    again = drift.run_benchmark(SEEDS, STEPS, policies=POLICIES[:1] + POLICIES[-1:])
    for scenario in ("stationary", "drift"):
        for policy in ("round_robin", "thompson+window"):
            assert (
                again["scenarios"][scenario]["policies"][policy]["runs"]
                == result["scenarios"][scenario]["policies"][policy]["runs"]
            )
    table = drift.render_markdown(result)
    assert "## stationary" in table and "## drift (drift at step 300)" in table
    assert all(f"| {p} |" in table for p in POLICIES)
