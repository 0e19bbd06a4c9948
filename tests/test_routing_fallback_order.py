"""A bandit's decision ranks its arms, and the gateway keeps that order when the chosen arm
fails (issue #16 point 4): the next-ranked arm answers, before the template's other
combinations, and the bandit learns the failure. Real gateway, fake OpenAI upstreams on
loopback answering OpenAI's error JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chat
from tests.fakes import openai_fake
from tests.fakes.server import FakeUpstream, Fault

VARS = {"words": 3}


@pytest.fixture
def ups() -> Iterator[dict[str, FakeUpstream]]:
    with ExitStack() as stack:
        yield {name: stack.enter_context(openai_fake.running()) for name in ("p1", "p2", "p3", "p4")}


def config(ups: dict[str, FakeUpstream], **gateway: Any) -> dict[str, Any]:
    def combo(cid: str, provider: str, **extra: Any) -> dict[str, Any]:
        return {"id": cid, "template_id": "summarise", "model": "gpt-4o", "provider": provider, **extra}

    return {
        "model_providers": {name: {"type": "openai", "base_url": up.base_url} for name, up in ups.items()},
        "gateway": {
            "strategy": "weighted_round_robin",
            "combinations": [
                combo("a", "p1", weight=5),  # the balancer's pick among the arms: the bandit's is not
                combo("b", "p2"),
                combo("c", "p3"),
                # not an arm, and the balancer's favourite: it must come after the ranked arms
                combo("z", "p4", weight=100),
            ],
            **gateway,
        },
        "routing": {
            "templates": {
                "summarise": [
                    {
                        "type": "bandit",
                        "name": "learner",
                        "arms": ["a", "b", "c"],
                        "policy": "epsilon_greedy",
                        "epsilon": 0.0,
                        "drift": "none",
                        "seed": 1,
                    }
                ]
            }
        },
    }


def seed_state(tmp_path: Path, means: dict[str, float], n: int = 10) -> None:
    """What the bandit learned before this start: `n` pulls per arm at these mean rewards."""
    path = tmp_path / "routing" / "bandit-learner.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    arms = {arm: {"n": n, "total": mean * n} for arm, mean in means.items()}
    path.write_text(json.dumps({"version": 1, "step": "learner", "policy": {"kind": "counts", "arms": arms}}))


def body(text: str) -> dict[str, Any]:
    return chat(text, model="summarise", variables=VARS)


async def test_next_ranked_arm_answers_when_the_chosen_one_fails(make_gateway, tmp_path, ups):
    # ranked c, b, a: not the config's order, so neither the balancer nor the config order could pass
    seed_state(tmp_path, {"a": 0.5, "b": 0.9, "c": 0.95})
    ups["p3"].faults.always = Fault("status", status=500)  # arm c's upstream is down
    gw = await make_gateway(config(ups))

    r = await gw.post(body("first question"))

    assert r.status_code == 200, r.text
    assert r.headers["x-rswitch-combination"] == "b"  # the next-ranked arm, not the balancer's z
    assert "pick c (mean 0.95, n=10); then b, a -> combination:c" in r.headers["x-rswitch-route"]
    assert len(ups["p2"].recorder.requests) == 1
    assert ups["p1"].recorder.requests == [] and ups["p4"].recorder.requests == []
    [row] = [row for row in gw.dataset_rows("summarise") if row["success"]]
    chain = json.loads(row["attempts"])
    assert [a["combination"] for a in chain][-1] == "b"
    assert {a["combination"] for a in chain[:-1]} == {"c"} and all(a["status"] == 500 for a in chain[:-1])

    # the bandit learned arm c's failure (reward 0): the next request goes to b first
    step = gw.core.gateway.template_chains["summarise"].steps[0]
    assert step.policy.get("c").mean < 0.9 < step.policy.get("b").mean
    r = await gw.post(body("second question"))
    assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "b"
    assert r.headers["x-rswitch-attempts"] == "1"
    assert "pick b" in r.headers["x-rswitch-route"] and "then c, a" in r.headers["x-rswitch-route"]


async def test_after_every_ranked_arm_come_fallbacks_then_the_pool(make_gateway, tmp_path, ups):
    """Order: the arms as ranked, then each one's explicit fallbacks, then the pool."""
    seed_state(tmp_path, {"a": 0.95, "b": 0.9})
    cfg = config(ups)
    cfg["gateway"]["combinations"][0]["fallbacks"] = ["c"]
    cfg["routing"]["templates"]["summarise"][0]["arms"] = ["a", "b"]
    gw = await make_gateway(cfg)
    route = await gw.core.gateway.resolver.resolve("summarise", {}, _query("hi"))
    assert [c.id for c in route.candidates] == ["a", "b", "c", "z"]


def _query(text: str) -> Any:
    from rswitch.routing.base import Query

    return Query([{"role": "user", "content": text}])


async def test_a_stream_falls_over_to_the_next_ranked_arm(make_gateway, tmp_path, ups):
    seed_state(tmp_path, {"a": 0.5, "b": 0.9, "c": 0.95})
    ups["p3"].faults.always = Fault("status", status=503, retry_after=1)  # c overloaded: straight on
    gw = await make_gateway(config(ups))
    async with gw.client.stream(
        "POST", "/v1/chat/completions", json={**body("stream it"), "stream": True}
    ) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert r.headers["x-rswitch-combination"] == "b" and r.headers["x-rswitch-attempts"] == "2"
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == (
        "echo: stream it"
    )
    assert ups["p1"].recorder.requests == [] and ups["p4"].recorder.requests == []
