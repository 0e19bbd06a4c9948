"""The judge step: expected score from score-token probabilities, timeout, breaker, cache."""

from __future__ import annotations

import asyncio
import math

import pytest

from rswitch.routing.judge import expected_score
from tests.conftest import chat
from tests.test_router_rules import COMBOS

JUDGE = {
    "tiers": {"premium": ["strong"], "budget": ["cheap"]},
    "default": [
        {
            "type": "judge",
            "provider": "mock",
            "model": "judge",
            "hard": "tier:premium",
            "easy": "tier:budget",
            "threshold": 3.0,
            "timeout_seconds": 0.2,
            "breaker_failures": 2,
            "breaker_cooldown_seconds": 60,
        }
    ],
}
VARS = {"words": 5}


def logprobs(dist: dict[str, float]) -> dict:
    top = [{"token": t, "logprob": math.log(p)} for t, p in dist.items()]
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": max(dist, key=dist.get)},
                "logprobs": {"content": [{"token": "x", "logprob": 0.0, "top_logprobs": top}]},
                "finish_reason": "length",
            }
        ]
    }


def test_expected_score_is_the_probability_weighted_mean_of_score_tokens():
    assert expected_score(logprobs({"1": 0.5, "5": 0.5})) == pytest.approx(3.0)
    # non-score tokens are ignored and the digits renormalised: a parsed digit would say "2"
    assert expected_score(logprobs({"2": 0.4, "The": 0.3, "4": 0.3})) == pytest.approx(
        (2 * 0.4 + 4 * 0.3) / 0.7
    )
    assert expected_score(logprobs({" 5": 0.2})) == pytest.approx(5.0)
    assert expected_score(logprobs({"The": 0.9})) is None
    assert expected_score({"choices": [{"message": {}}]}) is None


async def test_judge_routes_by_expected_score_and_caches_verdicts(make_gateway):
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": JUDGE})
    calls = []

    async def judge(call):
        calls.append(call)
        assert call.params == {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 20}
        hard = "prove" in call.messages[-1]["content"]
        return logprobs({"4": 0.7, "5": 0.3} if hard else {"1": 0.8, "2": 0.2})

    original = gw.core.providers["mock"].complete

    async def complete(call):
        return await judge(call) if call.model == "judge" else await original(call)

    gw.core.providers["mock"].complete = complete
    r = await gw.post(chat("prove that there are infinitely many primes", variables=VARS))
    assert r.headers["x-rswitch-combination"] == "strong"
    assert "judge: hard score=4.300/3.000 -> tier:premium" in r.headers["x-rswitch-route"]
    r = await gw.post(chat("hi there", variables=VARS))
    assert (
        r.headers["x-rswitch-combination"] == "cheap"
        and "judge: easy score=1.200/3.000" in r.headers["x-rswitch-route"]
    )
    await gw.post(chat("hi there", variables=VARS))
    assert len(calls) == 2  # the repeated prompt was judged from the cache


async def test_slow_or_failing_judge_passes_and_the_breaker_opens(make_gateway):
    gw = await make_gateway({"gateway": {"combinations": COMBOS}, "routing": JUDGE})
    original = gw.core.providers["mock"].complete
    judged = []

    async def complete(call):
        if call.model == "judge":
            judged.append(call)
            await asyncio.sleep(5)  # slower than timeout_seconds
        return await original(call)

    gw.core.providers["mock"].complete = complete
    for i in range(2):
        r = await gw.post(chat(f"question {i}", variables=VARS))
        assert (
            r.status_code == 200
            and "judge: pass (judge failed: TimeoutError) => balancer" in r.headers["x-rswitch-route"]
        )
    r = await gw.post(chat("question 3", variables=VARS))
    assert "judge: pass (breaker open)" in r.headers["x-rswitch-route"]
    assert len(judged) == 2  # with the breaker open the judge is not called at all


def test_judge_config_errors():
    from rswitch.config import ConfigError, parse_config

    bad = {"default": [{**JUDGE["default"][0], "hard": "tier:gold", "provider": "ghost"}]}
    with pytest.raises(ConfigError) as exc:
        parse_config(
            {
                "model_providers": {"mock": {"type": "mock"}},
                "gateway": {"combinations": COMBOS},
                "routing": bad,
            }
        )
    text = str(exc.value)
    assert (
        "routing.default[0].provider: unknown provider" in text
        and "routing.default[0].hard: unknown tier" in text
    )


@pytest.mark.slow
async def test_the_local_model_judges_through_its_score_token_probabilities(make_gateway):
    config = {
        "model_providers": {
            "mock": {"type": "mock"},
            "local": {"type": "local", "local": {"n_ctx": 512, "logits_all": True}},
        },
        "gateway": {"combinations": COMBOS},
        "routing": {
            **JUDGE,
            "default": [
                {**JUDGE["default"][0], "provider": "local", "model": "smollm2", "timeout_seconds": 30}
            ],
        },
    }
    gw = await make_gateway(config)
    r = await gw.post(chat("Prove the Riemann hypothesis in full detail.", variables=VARS))
    route = r.headers["x-rswitch-route"]
    assert r.status_code == 200 and route.startswith("judge: ")
    assert " score=" in route or "no score tokens" in route  # a real expected score, or an honest pass


@pytest.mark.slow
async def test_a_judge_without_a_provider_asks_the_embedded_model(make_gateway):
    step = {k: v for k, v in JUDGE["default"][0].items() if k not in ("provider", "model")}
    step["timeout_seconds"] = 30
    gw = await make_gateway(
        {
            "model_providers": {"mock": {"type": "mock"}},
            "gateway": {"combinations": COMBOS},
            "routing": {**JUDGE, "default": [step]},
        }
    )
    pc = gw.core.config.model_providers["rswitch-judge"]
    assert pc.type == "local" and pc.local.logits_all and pc.local.load == "lazy"
    assert gw.core.config.routing.default[0].provider == "rswitch-judge"
    r = await gw.post(chat("Prove the Riemann hypothesis in full detail.", variables=VARS))
    route = r.headers["x-rswitch-route"]
    assert r.status_code == 200 and route.startswith("judge: ")
    assert " score=" in route or "no score tokens" in route
