#!/usr/bin/env python3
"""Regret of the gateway's routing policies on simulated providers, with and without drift.

Four simulated providers ("arms") with known outcome distributions: an error rate, a quality
drawn from a Beta, a lognormal latency and a fixed price per call. A call's reward is the
gateway's own `reward()` (rswitch/routing/bandit.py) with the default BanditWeights, and each
arm's *expected* reward is computed in closed form (see `expected_reward`), so

    regret = sum over steps of (best arm's expected reward then - picked arm's expected reward).

Scenarios:
- stationary: the arms never change; "premium" is the best.
- drift: at half-time "premium" degrades (more errors, lower quality, slower) and becomes the
  worst; "balanced" becomes the best. Its success rate stays above the gateway's default
  fallback_threshold (0.8), so the health check alone does not demote it.

Policies, all driven offline through the gateway's real code, one request at a time:
- round_robin, weighted (3:1:1:1 towards the initially best arm), performance_based: the real
  `Balancer` over a `LiveMetrics` on a simulated clock (`--rps` requests per second), so its
  time window covers window_seconds * rps requests. It sees what the gateway records:
  success, latency and cost, and (unless --no-quality-signal) each answer's feedback score,
  as POST /v1/feedback hands it to the live metrics.
- {epsilon_greedy, ucb1, thompson} x {none, window, discounted}: the real BanditStep built by
  `build_bandit` from a BanditStepConfig with the gateway's defaults; picks with its policy and
  learns through `BanditStep.observe` (success, quality, cost, latency).

Each seed draws one outcome table (every arm, every step) that all policies share, so their
differences are not sampling noise between environments. Feedback is immediate and each
request has one attempt: the gateway's retries and fallbacks on failure are not simulated.

"Steps to recover" (drift only): steps after the drift until the share of the last 100 picks
going to the new best arm first exceeds 50% (at least 51 for a policy that never picked it).

Usage: python benchmarks/routing/drift.py [--seeds 20] [--steps 4000] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np

from rswitch.config import BanditStepConfig, GatewayConfig
from rswitch.gateway.balancer import Balancer, Combination
from rswitch.gateway.metrics import LiveMetrics, WindowStats
from rswitch.routing.bandit import BanditWeights
from rswitch.routing.chains import build_bandit

RECOVERY_WINDOW = 100
WEIGHTED_WEIGHTS = (3.0, 1.0, 1.0, 1.0)  # an operator favouring the initially best arm
BALANCER_POLICIES = ("round_robin", "weighted", "performance_based")
BANDIT_POLICIES = tuple(
    f"{p}+{d}" for p in ("epsilon_greedy", "ucb1", "thompson") for d in ("none", "window", "discounted")
)
POLICIES = BALANCER_POLICIES + BANDIT_POLICIES


# -- the environment ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    name: str
    error_rate: float
    quality_mean: float
    latency_median_ms: float
    cost: float  # USD per call
    quality_concentration: float = 8.0  # Beta(mean * k, (1 - mean) * k)
    latency_sigma: float = 0.5  # of log latency


@dataclass(frozen=True)
class Scenario:
    name: str
    before: tuple[Arm, ...]
    after: tuple[Arm, ...]  # the same arms from the drift point on (equal to `before` if stationary)

    def drift_step(self, steps: int) -> int | None:
        return steps // 2 if self.after != self.before else None


PREMIUM = Arm("premium", error_rate=0.02, quality_mean=0.90, latency_median_ms=1500, cost=0.004)
ARMS = (
    PREMIUM,
    Arm("balanced", error_rate=0.03, quality_mean=0.74, latency_median_ms=900, cost=0.0015),
    Arm("fast", error_rate=0.05, quality_mean=0.60, latency_median_ms=400, cost=0.0003),
    Arm("budget", error_rate=0.10, quality_mean=0.68, latency_median_ms=1100, cost=0.0008),
)
DEGRADED = replace(PREMIUM, error_rate=0.12, quality_mean=0.55, latency_median_ms=4000)
SCENARIOS = (
    Scenario("stationary", ARMS, ARMS),
    Scenario("drift", ARMS, (DEGRADED, *ARMS[1:])),
)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def expected_reward(arm: Arm, weights: BanditWeights = BanditWeights()) -> float:
    """E[reward(...)] for one call to `arm`, in closed form.

    Quality is a Beta in [0, 1], so the clamp is a no-op and its mean is `quality_mean`. For a
    lognormal latency L = exp(mu + sigma Z) and the cap s = latency_scale_ms,
    E[min(L, s)] = exp(mu + sigma^2 / 2) Phi(z - sigma) + s (1 - Phi(z)) with z = (ln s - mu) / sigma.
    """
    w = weights
    mu, sigma, cap = math.log(arm.latency_median_ms), arm.latency_sigma, w.latency_scale_ms
    z = (math.log(cap) - mu) / sigma
    capped_latency = math.exp(mu + sigma**2 / 2) * _normal_cdf(z - sigma) + cap * (1 - _normal_cdf(z))
    fast = 1.0 - capped_latency / cap
    cheap = 1.0 - min(arm.cost / w.cost_scale, 1.0)
    total = w.success + w.quality + w.cost + w.latency
    on_success = (w.success + w.quality * arm.quality_mean + w.cost * cheap + w.latency * fast) / total
    return (1.0 - arm.error_rate) * on_success


@dataclass
class Outcomes:
    """One seed's draws: outcome of calling arm j at step t, for every t and j."""

    ok: list[list[bool]]
    quality: list[list[float]]
    latency_ms: list[list[float]]


def draw_outcomes(scenario: Scenario, steps: int, seed: int) -> Outcomes:
    rng = np.random.default_rng(seed)
    n = len(scenario.before)
    drift = scenario.drift_step(steps) or steps
    u = rng.random((steps, n))  # shared by both phases: an arm's luck carries over the drift
    z = rng.standard_normal((steps, n))
    ok = np.empty((steps, n), dtype=bool)
    quality = np.empty((steps, n))
    latency = np.empty((steps, n))
    for rows, arms in ((slice(0, drift), scenario.before), (slice(drift, steps), scenario.after)):
        m = rows.stop - rows.start
        for j, arm in enumerate(arms):
            k = arm.quality_concentration
            ok[rows, j] = u[rows, j] >= arm.error_rate
            quality[rows, j] = rng.beta(arm.quality_mean * k, (1 - arm.quality_mean) * k, m)
            latency[rows, j] = np.exp(math.log(arm.latency_median_ms) + arm.latency_sigma * z[rows, j])
    return Outcomes(ok.tolist(), quality.tolist(), latency.tolist())


# -- the policies, driven offline ---------------------------------------------------------------


class Router(Protocol):
    def pick(self, step: int) -> int: ...
    def record(self, arm: int, ok: bool, quality: float, cost: float, latency_ms: float) -> None: ...


class SimulatedClockMetrics(LiveMetrics):
    """The gateway's LiveMetrics with time set by the simulation (`now`, in seconds).

    Samples are re-stamped with the simulated time and the window is computed by LiveMetrics'
    own `_compute`. Stats are cached until an arm records a call or a sample leaves the
    window, which gives what `_compute` would return (except requests_per_s, which the
    Balancer does not read) at a fraction of the cost.
    """

    def __init__(self, window_seconds: float) -> None:
        super().__init__(window_seconds, cache_seconds=0.0)
        self.now = 0.0
        self._stats: dict[str, WindowStats] = {}

    def observe(
        self,
        combination_id: str,
        ok: bool,
        latency_ms: float,
        ttft_ms: float | None,
        cost: float,
        tokens: int,
    ) -> None:
        super().observe(combination_id, ok, latency_ms, ttft_ms, cost, tokens)
        samples = self._series[combination_id].samples
        samples[-1] = (self.now, *samples[-1][1:])
        self._stats.pop(combination_id, None)

    def observe_quality(self, combination_id: str, score: float) -> None:
        super().observe_quality(combination_id, score)
        quality = self._series[combination_id].quality
        quality[-1] = (self.now, quality[-1][1])
        self._stats.pop(combination_id, None)

    def window_stats(self, combination_id: str, fresh: bool = False) -> WindowStats:
        series = self._series.get(combination_id)
        expired = series is not None and series.samples and series.samples[0][0] < self.now - self.window
        cached = self._stats.get(combination_id)
        if cached is None or expired:
            cached = self._stats[combination_id] = self._compute(combination_id, self.now)
        return cached


class BalancerRouter:
    """The gateway's Balancer with its default settings (GatewayConfig), one pool of all arms."""

    def __init__(
        self,
        strategy: str,
        arms: Sequence[Arm],
        weights: Sequence[float],
        seed: int,
        rps: float,
        quality_signal: bool = False,
    ):
        gw = GatewayConfig()
        self.quality_signal = quality_signal
        self.metrics = SimulatedClockMetrics(gw.window_seconds)
        self.balancer = Balancer(
            strategy,
            self.metrics,
            fallback_threshold=gw.fallback_threshold,
            min_requests=gw.min_requests,
            exploration=gw.exploration,
            seed=seed,
        )
        self.combos = {
            a.name: Combination(a.name, "bench", a.name, a.name, weight=w)
            for a, w in zip(arms, weights, strict=True)
        }
        self.pool = list(self.combos.values())
        self.index = {a.name: j for j, a in enumerate(arms)}
        self.rps = rps

    def pick(self, step: int) -> int:
        self.metrics.now = step / self.rps
        # a new version each request: the gateway refreshes effective weights every
        # cache_seconds (0.25 s) of wall time, i.e. about every request at this rate
        eff = self.balancer.effective_weights(self.combos, version=step)
        return self.index[self.balancer.pick("bench", self.pool, eff).id]

    def record(self, arm: int, ok: bool, quality: float, cost: float, latency_ms: float) -> None:
        # what pipeline._record reports, then (with the quality signal) the answer's feedback
        # score, as POST /v1/feedback hands it to the live metrics
        self.metrics.observe(self.pool[arm].id, ok, latency_ms, None, cost, 0)
        if self.quality_signal and ok:
            self.metrics.observe_quality(self.pool[arm].id, quality)


class BanditRouter:
    """The gateway's BanditStep, built from its config the way the gateway builds it."""

    def __init__(self, policy: str, drift: str, arms: Sequence[Arm], seed: int, quality_signal: bool):
        names = [a.name for a in arms]
        config = BanditStepConfig(type="bandit", arms=names, policy=policy, drift=drift, seed=seed)
        self.step = build_bandit(config, lambda name: (f"combination:{name}", (name,)), None)
        self.index = {n: j for j, n in enumerate(names)}
        self.names = names
        self.quality_signal = quality_signal

    def pick(self, step: int) -> int:
        # what BanditStep.decide does, minus the coroutine and the explanation string
        return self.index[self.step.policy.select(self.step.arms, self.step.rng)]

    def record(self, arm: int, ok: bool, quality: float, cost: float, latency_ms: float) -> None:
        q = quality if self.quality_signal else None
        self.step.observe(self.names[arm], ok, q, cost, latency_ms)


def make_router(policy: str, arms: Sequence[Arm], seed: int, rps: float, quality_signal: bool) -> Router:
    if policy == "round_robin":
        return BalancerRouter("round_robin", arms, [1.0] * len(arms), seed, rps)
    if policy == "weighted":
        return BalancerRouter("weighted_round_robin", arms, WEIGHTED_WEIGHTS, seed, rps)
    if policy == "performance_based":
        return BalancerRouter("performance_based", arms, [1.0] * len(arms), seed, rps, quality_signal)
    name, _, drift = policy.partition("+")
    return BanditRouter(name, drift, arms, seed, quality_signal)


# -- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    policy: str
    seed: int
    regret: float
    best_share: float  # share of picks that went to the arm best at that step
    recovery_steps: int | None  # drift only; None if it never recovered (or no drift)
    post_drift_regret: float | None


def recovery_steps(picks: np.ndarray, arm: int, start: int, window: int = RECOVERY_WINDOW) -> int | None:
    """Steps from `start` until the share of `arm` among the last `window` picks exceeds 1/2."""
    hits = np.concatenate(([0], np.cumsum(picks == arm)))
    t = np.arange(start, len(picks))
    lo = np.maximum(t + 1 - window, 0)
    share = (hits[t + 1] - hits[lo]) / (t + 1 - lo)
    above = np.flatnonzero(share > 0.5)
    return int(above[0]) + 1 if above.size else None


def run_policy(
    scenario: Scenario,
    policy: str,
    seed: int,
    steps: int,
    outcomes: Outcomes,
    *,
    rps: float = 2.0,
    quality_signal: bool = True,
) -> RunResult:
    router = make_router(policy, scenario.before, seed, rps, quality_signal)
    costs = [a.cost for a in scenario.before]
    picks = np.empty(steps, dtype=np.int64)
    for t in range(steps):
        j = router.pick(t)
        picks[t] = j
        router.record(j, outcomes.ok[t][j], outcomes.quality[t][j], costs[j], outcomes.latency_ms[t][j])

    drift = scenario.drift_step(steps)
    split = drift if drift is not None else steps
    means = np.array(
        [[expected_reward(a) for a in scenario.before]] * split
        + [[expected_reward(a) for a in scenario.after]] * (steps - split)
    )
    step_regret = means.max(axis=1) - means[np.arange(steps), picks]
    best = means.argmax(axis=1)
    return RunResult(
        policy=policy,
        seed=seed,
        regret=float(step_regret.sum()),
        best_share=float(np.mean(picks == best)),
        recovery_steps=recovery_steps(picks, int(best[-1]), drift) if drift is not None else None,
        post_drift_regret=float(step_regret[split:].sum()) if drift is not None else None,
    )


def _run_seed(args: tuple[Scenario, int, int, tuple[str, ...], float, bool]) -> list[RunResult]:
    scenario, seed, steps, policies, rps, quality_signal = args
    outcomes = draw_outcomes(scenario, steps, seed)
    return [
        run_policy(scenario, p, seed, steps, outcomes, rps=rps, quality_signal=quality_signal)
        for p in policies
    ]


# -- the benchmark ------------------------------------------------------------------------------


def summarise(runs: list[RunResult], steps: int, drift: bool) -> dict[str, Any]:
    regrets = [r.regret for r in runs]
    out: dict[str, Any] = {
        "regret_mean": statistics.fmean(regrets),
        "regret_std": statistics.stdev(regrets) if len(regrets) > 1 else 0.0,
        "regret_per_1000": statistics.fmean(regrets) / steps * 1000,
        "best_share": statistics.fmean(r.best_share for r in runs),
    }
    if drift:
        recovered = [r.recovery_steps for r in runs if r.recovery_steps is not None]
        out["post_drift_regret_mean"] = statistics.fmean(r.post_drift_regret or 0.0 for r in runs)
        out["recovery_median"] = statistics.median(recovered) if recovered else None
        out["never_recovered"] = len(runs) - len(recovered)
    return out


def run_benchmark(
    seeds: int = 20,
    steps: int = 4000,
    *,
    policies: Sequence[str] = POLICIES,
    scenarios: Sequence[Scenario] = SCENARIOS,
    rps: float = 2.0,
    quality_signal: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Every policy on every scenario for seeds 0..seeds-1; deterministic for given arguments."""
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies: {sorted(unknown)}")
    tasks = [
        (sc, seed, steps, tuple(policies), rps, quality_signal) for sc in scenarios for seed in range(seeds)
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            batches = list(pool.map(_run_seed, tasks))
    else:
        batches = [_run_seed(t) for t in tasks]

    result: dict[str, Any] = {
        "config": {
            "seeds": seeds,
            "steps": steps,
            "rps": rps,
            "quality_signal": quality_signal,
            "recovery_window": RECOVERY_WINDOW,
            "weighted_weights": list(WEIGHTED_WEIGHTS),
        },
        "scenarios": {},
    }
    for sc in scenarios:
        runs = [r for task, batch in zip(tasks, batches, strict=True) if task[0] is sc for r in batch]
        drift = sc.drift_step(steps)
        result["scenarios"][sc.name] = {
            "drift_step": drift,
            "arms_before": [{**asdict(a), "expected_reward": expected_reward(a)} for a in sc.before],
            "arms_after": [{**asdict(a), "expected_reward": expected_reward(a)} for a in sc.after],
            "policies": {
                p: {
                    **summarise([r for r in runs if r.policy == p], steps, drift is not None),
                    "runs": [asdict(r) for r in runs if r.policy == p],
                }
                for p in policies
            },
        }
    return result


def _arm_cell(before: dict[str, Any], after: dict[str, Any]) -> Callable[[str, str], str]:
    def cell(key: str, fmt: str) -> str:
        b, a = before[key], after[key]
        return f"{b:{fmt}} → {a:{fmt}}" if a != b else f"{b:{fmt}}"

    return cell


def render_markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"# Routing regret: {cfg['seeds']} seeds x {cfg['steps']} steps, {cfg['rps']:g} req/s simulated, "
        f"bandits {'see' if cfg['quality_signal'] else 'do not see'} quality",
    ]
    for name, sc in result["scenarios"].items():
        drift = sc["drift_step"]
        lines += ["", f"## {name}" + (f" (drift at step {drift})" if drift is not None else ""), ""]
        lines += [
            "| arm | error | quality | p50 latency ms | cost $ | E[reward] |",
            "|---|---|---|---|---|---|",
        ]
        for before, after in zip(sc["arms_before"], sc["arms_after"], strict=True):
            cell = _arm_cell(before, after)

            lines.append(
                f"| {before['name']} | {cell('error_rate', '.2f')} | {cell('quality_mean', '.2f')} "
                f"| {cell('latency_median_ms', '.0f')} | {cell('cost', '.4f')} | {cell('expected_reward', '.3f')} |"
            )
        lines.append("")
        head = "| policy | regret (mean ± std) | regret / 1k steps | best-arm share |"
        rule = "|---|---:|---:|---:|"
        if drift is not None:
            head += " regret after drift | steps to recover (median) | never recovered |"
            rule += "---:|---:|---:|"
        lines += [head, rule]
        for policy, s in sc["policies"].items():
            row = (
                f"| {policy} | {s['regret_mean']:.1f} ± {s['regret_std']:.1f} | {s['regret_per_1000']:.2f} "
                f"| {s['best_share']:.1%} |"
            )
            if drift is not None:
                rec = "–" if s["recovery_median"] is None else f"{s['recovery_median']:g}"
                row += f" {s['post_drift_regret_mean']:.1f} | {rec} | {s['never_recovered']}/{cfg['seeds']} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--rps", type=float, default=2.0, help="simulated requests per second (Balancer window)")
    ap.add_argument(
        "--no-quality-signal",
        action="store_true",
        help="bandits learn with quality=None, as pipeline._record reports today (regret still counts quality)",
    )
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="write the full results (with per-seed runs) here")
    ap.add_argument("--markdown", help="write the tables here")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 2:
        ap.error("need --seeds >= 1 and --steps >= 2")

    started = time.perf_counter()
    result = run_benchmark(
        args.seeds,
        args.steps,
        policies=[p for p in args.policies.split(",") if p],
        rps=args.rps,
        quality_signal=not args.no_quality_signal,
        workers=args.workers,
    )
    result["config"]["seconds"] = round(time.perf_counter() - started, 1)
    text = render_markdown(result)
    sys.stdout.write(text)
    print(f"\n({result['config']['seconds']} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
