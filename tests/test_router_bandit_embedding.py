"""LinUCB on prompt embeddings: the contextual bandit learns which arm suits which kind of prompt."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from rswitch.config import ConfigError, parse_config
from rswitch.providers.encoder import StaticEncoder
from rswitch.routing.bandit import BanditStep, BanditWeights, LinUCB
from rswitch.routing.base import Query
from tests.conftest import chat
from tests.test_router_rules import COMBOS

LEGAL = [
    "review the termination clause of this contract",
    "is a verbal agreement legally binding",
    "can my landlord keep the deposit under the lease",
    "draft a non-disclosure agreement for a contractor",
    "what does indemnify mean in this agreement",
    "is this non-compete clause enforceable",
]
CASUAL = [
    "will it rain in paris tomorrow",
    "suggest a name for my new puppy",
    "what should i cook for dinner tonight",
    "tell me a joke about cats",
    "what is the weather like this weekend",
    "recommend a fun board game for kids",
]


def q(text: str) -> Query:
    return Query([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def encoder():
    return StaticEncoder()


async def test_linucb_on_embeddings_learns_which_arm_suits_which_topic(encoder):
    async def embed(texts):
        return encoder.encode(texts)

    step = BanditStep(
        "ctx",
        ["lawyer", "chat"],
        LinUCB(alpha=0.5, dim=None),
        BanditWeights(success=0, quality=1, cost=0, latency=0),  # the reward is the quality
        rng=random.Random(0),
        embed=embed,
        context_id="embedding:static",
    )
    rng = random.Random(1)
    train = [(t, "lawyer") for t in LEGAL[:4]] + [(t, "chat") for t in CASUAL[:4]]
    for _ in range(40):
        text, best = rng.choice(train)
        query = q(text)
        arm = (await step.decide(query)).combinations[0]
        step.observe(arm, True, 1.0 if arm == best else 0.1, context=step.context_for(query))
    assert step.policy.dim == 257  # a bias term and the 256-dimensional embedding
    # unseen prompts of each kind go to the arm that served their kind well
    for text in LEGAL[4:]:
        assert (await step.decide(q(text))).combinations[0] == "lawyer", text
    for text in CASUAL[4:]:
        assert (await step.decide(q(text))).combinations[0] == "chat", text


def test_sherman_morrison_inverse_matches_a_direct_inverse():
    rng = np.random.default_rng(0)
    policy = LinUCB(alpha=1.0, dim=None)
    for _ in range(30):
        policy.update("a", float(rng.random()), rng.normal(size=12))
    np.testing.assert_allclose(policy.A_inv["a"], np.linalg.inv(policy.A["a"]), atol=1e-8)
    x = rng.normal(size=12)
    mean, width = policy._estimate("a", x)
    a_inv = np.linalg.inv(policy.A["a"])
    assert mean == pytest.approx(float(a_inv @ policy.b["a"] @ x))
    assert width == pytest.approx(float(np.sqrt(x @ a_inv @ x)))


ROUTING = {
    "default": [
        {
            "type": "bandit",
            "name": "learner",
            "arms": ["cheap", "strong"],
            "policy": "linucb",
            "context": "embedding",
            "encoder": {"provider": "enc", "model": "wordllama-256"},
            "seed": 3,
        }
    ]
}
CONFIG = {
    "model_providers": {"enc": {"type": "encoder", "models": ["wordllama-256"]}},
    "gateway": {"combinations": COMBOS},
    "routing": ROUTING,
}


async def test_gateway_embeds_each_prompt_once_and_learns_against_that_vector(make_gateway, tmp_path):
    gw = await make_gateway(CONFIG)
    step = gw.core.gateway.default_chain.steps[0]
    provider = gw.core.providers["enc"]
    calls = []
    original = provider.encode

    async def counting(texts):
        calls.append(list(texts))
        return await original(texts)

    step.embed = counting
    for text in ["summarise this contract clause", "summarise the weather report"]:
        r = await gw.post(chat(text, variables={"words": 5}))
        assert r.status_code == 200
        assert "learner: linucb pick" in r.headers["x-rswitch-route"]
    assert len(calls) == 2  # once per request: the outcome reuses the decision's vector
    assert sum(step.policy.n.values()) == 2
    step.close()
    saved = json.loads((tmp_path / "routing" / "bandit-learner.json").read_text())
    assert saved["context"].startswith("embedding:encoder:static:wordllama")
    assert saved["policy"]["dim"] == 257


async def test_state_learned_on_another_context_is_dropped(make_gateway, tmp_path):
    state = tmp_path / "routing" / "bandit-learner.json"
    state.parent.mkdir(parents=True)
    dim = 257
    arms = {"cheap": {"A": np.eye(dim).tolist(), "b": [0.0] * dim, "n": 7}}
    state.write_text(
        json.dumps(
            {
                "context": "embedding:some-other-encoder",
                "policy": {"kind": "linucb", "dim": dim, "arms": arms},
            }
        )
    )
    gw = await make_gateway(CONFIG)
    assert gw.core.gateway.default_chain.steps[0].policy.n == {}  # not reused: other vectors, other meaning


async def test_a_failing_encoder_makes_the_bandit_pass(make_gateway):
    gw = await make_gateway(CONFIG)
    step = gw.core.gateway.default_chain.steps[0]

    async def broken(texts):
        raise ConnectionError("encoder down")

    step.embed = broken
    r = await gw.post(chat("summarise this", variables={"words": 5}))
    assert r.status_code == 200  # the balancer served it
    assert "learner: pass (no context: ConnectionError)" in r.headers["x-rswitch-route"]
    assert step.policy.n == {}


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"policy": "thompson"}, "routing.default[0].context", "needs policy: linucb"),
        ({"encoder": None}, "routing.default[0].encoder", "needs an encoder"),
        (
            {"encoder": {"provider": "ghost", "model": "x"}},
            "routing.default[0].encoder.provider",
            "unknown provider",
        ),
    ],
)
def test_embedding_context_config_errors(change, path, message):
    step = dict(ROUTING["default"][0]) | change
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG | {"routing": {"default": [step]}})
    text = str(info.value)
    assert path in text and message in text


async def test_no_text_or_a_nan_vector_makes_the_step_pass_and_learns_nothing(encoder):
    async def embed(texts):
        return encoder.encode(texts)

    step = BanditStep("ctx", ["a", "b"], LinUCB(dim=None), rng=random.Random(0), embed=embed, context_id="e")
    system_only = Query([{"role": "system", "content": "be brief"}])
    assert (await step.decide(system_only)).startswith("no context")

    async def nan(texts):
        return np.full((len(texts), 8), np.nan)

    step.embed = nan
    assert (await step.decide(q("hello"))).startswith("no context")
    assert step.policy.n == {} and step.policy.dim is None  # nothing poisoned


async def test_state_of_another_dimension_passes_instead_of_failing_requests(encoder):
    async def embed(texts):
        return encoder.encode(texts)

    policy = LinUCB(dim=None)
    policy.update("a", 1.0, np.ones(9))  # learned on a 9-dimensional context (another encoder)
    step = BanditStep("ctx", ["a", "b"], policy, rng=random.Random(0), embed=embed, context_id="e")
    assert (await step.decide(q("hello"))).startswith("no context: ValueError")
