"""The learned quality router (`type: learned`): fitted on a real gateway's recorded rows and the
feedback users gave them, it sends each prompt to the cheapest combination predicted to answer
it well, explains why in x-rswitch-route, and ranks its arms for the chain's fallbacks."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import ConfigError
from rswitch.routing.base import Query
from rswitch.routing.learned import ArtifactError, LearnedModel, NotEnoughLabels, learned_path
from tests.conftest import chat, make_config

runner = CliRunner()
COMBOS = [
    {"id": "cheap", "template_id": "summarise", "model": "small", "provider": "mock"},
    {"id": "strong", "template_id": "summarise", "model": "large", "provider": "mock"},
]
VARS = {"words": 5}
# Two kinds of prompt: the cheap model fails the arithmetic ones (users score its answers 0) and
# answers the greetings as well as the strong one. Deterministic: the scores follow the topic.
MATHS = [f"solve the equation {a} x plus {b} equals {a + b + 3} for x" for a in range(2, 14) for b in (1, 5)]
CHAT = [f"say a warm hello to my friend number {n} today" for n in range(24)]


def learned(**extra):
    step = {
        "type": "learned",
        "name": "quality",
        "arms": ["cheap", "strong"],
        "encoder": {"provider": "mock", "model": "mock-embed"},
        "min_labels": 20,
        "strong_share": 0.5,
        "refit": {"every_labels": 0},
    }
    step.update(extra)
    return {"gateway": {"combinations": COMBOS}, "routing": {"templates": {"summarise": [step]}}}


def quality(combination: str, prompt: str) -> float:
    return 0.0 if combination == "cheap" and prompt.startswith("solve") else 1.0


async def record_with_feedback(gw, prompts):
    """Each prompt answered by both combinations, each answer scored by a user."""
    for prompt in prompts:
        for cid in ("cheap", "strong"):
            body = chat(prompt, model="summarise", variables=VARS, metadata={"combination_id": cid})
            r = await gw.post(body)
            assert r.status_code == 200 and r.headers["x-rswitch-combination"] == cid
            rid = r.headers["x-rswitch-request-id"]
            gw.flush()
            fb = await gw.client.post("/v1/feedback", json={"request_id": rid, "score": quality(cid, prompt)})
            assert fb.status_code == 202
    gw.flush()


def step_of(gw):
    return gw.core.gateway.template_chains["summarise"].steps[0]


async def routed(gw, prompt):
    r = await gw.post(chat(prompt, model="summarise", variables=VARS))
    assert r.status_code == 200
    return r.headers["x-rswitch-combination"], r.headers["x-rswitch-route"]


async def test_fits_on_recorded_feedback_and_sends_each_prompt_to_the_cheapest_good_arm(make_gateway):
    gw = await make_gateway(learned())
    step = step_of(gw)
    # before any label it passes, saying why, and the balancer decides
    _, route = await routed(gw, MATHS[0])
    assert "quality: pass (not fitted yet" in route and "=> balancer" in route
    await record_with_feedback(gw, MATHS[:16] + CHAT[:16])
    report = await step.fit()
    assert report.rows == 64 and report.per_arm == {"cheap": 32, "strong": 32}
    # unseen prompts of each kind: arithmetic to the strong model, greetings stay cheap
    for prompt in MATHS[16:]:
        combo, route = await routed(gw, prompt)
        assert combo == "strong", route
    for prompt in CHAT[16:]:
        combo, route = await routed(gw, prompt)
        assert combo == "cheap", route
    # the explanation: each arm's predicted score, the nearest labelled rows with what they got
    combo, route = await routed(gw, MATHS[20])
    assert "quality: predicted cheap=" in route and " strong=" in route
    assert "; nearest #" in route and "(cheap=0.0,strong=1.0)" in route
    assert route.endswith("-> combination:strong" + route[route.index(" =>") :])
    # the decision ranks every arm: chosen first, so a failed call moves down the ranking
    decision = await step.decide(Query([{"role": "user", "content": MATHS[20]}]))
    assert decision.combinations == ("strong", "cheap")
    decision = await step.decide(Query([{"role": "user", "content": CHAT[20]}]))
    assert decision.combinations[0] == "cheap" and set(decision.combinations) == {"cheap", "strong"}


async def test_the_fitted_model_is_saved_and_a_restarted_gateway_routes_with_it(make_gateway, tmp_path):
    gw = await make_gateway(learned())
    await record_with_feedback(gw, MATHS[:12] + CHAT[:12])
    await step_of(gw).fit()
    path = learned_path(tmp_path / "routing", "summarise", "quality")
    assert path.is_file()
    with np.load(path, allow_pickle=False) as z:  # plain arrays: nothing to unpickle
        assert json.loads(bytes(z["meta"]).decode())["arms"] == ["cheap", "strong"]
    again = await make_gateway(learned())
    assert step_of(again).model is not None
    assert (await routed(again, MATHS[-1]))[0] == "strong"
    assert (await routed(again, CHAT[-1]))[0] == "cheap"


async def test_strong_share_sets_how_much_traffic_leaves_the_cheapest_arm(make_gateway):
    gw = await make_gateway(learned())
    await record_with_feedback(gw, MATHS[:12] + CHAT[:12])
    await step_of(gw).fit()
    prompts = MATHS[12:] + CHAT[12:]
    shares = {}
    for share in (0.0, 0.5, 1.0):
        other = await make_gateway(learned(strong_share=share))  # the same model file, another knob
        served = [(await routed(other, p))[0] for p in prompts]
        shares[share] = served.count("strong") / len(served)
    assert shares[0.0] == 0.0
    assert 0.3 <= shares[0.5] <= 0.7  # the arithmetic half
    assert shares[1.0] == 1.0


async def test_too_few_labels_is_refused_and_the_step_passes_with_the_reason(make_gateway):
    gw = await make_gateway(learned(min_labels=40))
    await record_with_feedback(gw, MATHS[:6] + CHAT[:6])  # 24 labelled rows
    step = step_of(gw)
    with pytest.raises(NotEnoughLabels, match="24 labelled rows of its arms, fewer than min_labels 40"):
        await step.fit()
    assert step.model is None
    _, route = await routed(gw, MATHS[0])
    assert "quality: pass (not fitted yet" in route and "=> balancer" in route


async def test_labels_arriving_refit_the_step_in_the_background(make_gateway):
    gw = await make_gateway(learned(refit={"every_labels": 10, "check_seconds": 0.05}))
    step = step_of(gw)
    await record_with_feedback(gw, MATHS[:12] + CHAT[:12])
    async with asyncio.timeout(30):
        while step.model is None:
            await asyncio.sleep(0.05)
    first = step.model
    assert first.n_labels >= 20
    await record_with_feedback(gw, MATHS[12:20] + CHAT[12:20])  # 32 more labelled rows
    async with asyncio.timeout(30):
        while step.model is first or step.model.n_labels < 80:
            await asyncio.sleep(0.05)
    assert (await routed(gw, MATHS[-1]))[0] == "strong"


async def test_a_bad_model_file_is_refused_with_what_is_wrong(make_gateway, tmp_path):
    gw = await make_gateway(learned())
    await record_with_feedback(gw, MATHS[:12] + CHAT[:12])
    await step_of(gw).fit()
    path = learned_path(tmp_path / "routing", "summarise", "quality")
    good = path.read_bytes()
    with pytest.raises(ArtifactError, match="fitted for arms"):
        LearnedModel.load(path, ["strong", "cheap"])
    with pytest.raises(ArtifactError, match="fitted with encoder"):
        LearnedModel.load(path, ["cheap", "strong"], "encoder:other")
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ArtifactError, match="is not a learned-router model"):
        LearnedModel.load(path)
    # a pickled object array is never loaded
    np.savez(path, meta=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(ArtifactError):
        LearnedModel.load(path)
    # arrays that do not fit together
    with _open(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["intercept"] = arrays["intercept"][:1]
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="intercept"):
        LearnedModel.load(path)
    # a gateway started on the bad file passes, naming the problem, and serves on
    again = await make_gateway(learned())
    combo, route = await routed(again, MATHS[0])
    assert "quality: pass (" in route and "inconsistent arrays" in route and combo in ("cheap", "strong")


def _open(data: bytes):
    import io

    return np.load(io.BytesIO(data), allow_pickle=False)


async def test_route_fit_step_fits_a_learned_step_from_the_recorded_rows(make_gateway, tmp_path):
    gw = await make_gateway(learned())
    await record_with_feedback(gw, MATHS[:12] + CHAT[:12])
    data = learned()
    data["model_providers"] = {"mock": {"type": "mock"}}
    data["templates"] = {"summarise": {"template": "Summarise in {words} words."}}
    data["dataset"] = {"base_path": str(tmp_path / "prompts")}
    data["analytics"] = {"path": str(tmp_path / "other.duckdb")}
    cfg_file = tmp_path / "rswitch.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    res = await asyncio.to_thread(
        runner.invoke,
        app,
        ["route", "fit", "--config", str(cfg_file), "--template", "summarise", "--step", "quality"],
    )
    assert res.exit_code == 0, res.output
    assert "labelled  48 rows over 24 prompts: cheap 24, strong 24" in res.output
    assert learned_path(tmp_path / "routing", "summarise", "quality").is_file()
    # route explain decides with it, and says why
    res = await asyncio.to_thread(
        runner.invoke,
        app,
        ["route", "explain", MATHS[-1], "--config", str(cfg_file), "--template", "summarise"],
    )
    assert res.exit_code == 0, res.output
    assert "quality: predicted cheap=" in res.output and "decision    combination:strong" in res.output
    # the running gateway loads the file the command wrote
    assert step_of(gw).reload_if_changed() and step_of(gw).model is not None
    # too few labels: a one-line error, nothing written
    data["routing"]["templates"]["summarise"][0].update(name="other", min_labels=100)
    cfg_file.write_text(yaml.safe_dump(data))
    res = await asyncio.to_thread(
        runner.invoke,
        app,
        ["route", "fit", "--config", str(cfg_file), "--template", "summarise", "--step", "other"],
    )
    assert res.exit_code != 0 and "fewer than min_labels 100" in res.output
    assert not learned_path(tmp_path / "routing", "summarise", "other").exists()


def test_config_errors_name_the_key(tmp_path):
    bad = learned(arms=["cheap", "nope"])
    with pytest.raises(
        ConfigError, match=r"routing\.templates\.summarise\[0\]\.arms\[1\].*unknown combination"
    ):
        make_config(tmp_path, bad)
    one = learned(arms=["cheap"])
    with pytest.raises(ConfigError, match="at least two combinations"):
        make_config(tmp_path, one)
    gateway_wide = learned()
    gateway_wide["routing"] = {"default": gateway_wide["routing"]["templates"]["summarise"]}
    with pytest.raises(ConfigError, match=r"routing\.default\[0\]\.template"):
        make_config(tmp_path, gateway_wide)


async def test_the_optimize_action_refits_the_templates_learned_steps(make_gateway):
    """The console's optimize key and the admin API's optimize: the template's learned steps are
    refitted too (here with the optimizer off), and the event log says how it went."""
    from rswitch.admin.api import PREFIX

    gw = await make_gateway(learned())
    await record_with_feedback(gw, MATHS[:12] + CHAT[:12])
    step = step_of(gw)
    assert step.model is None
    r = await gw.client.post(PREFIX + "/optimizer/runs", json={"template_id": "summarise"})
    assert r.status_code == 202 and r.json() == {"status": "queued", "template_id": "summarise"}
    async with asyncio.timeout(30):
        while step.model is None:
            await asyncio.sleep(0.02)
    events = [text for _, _, kind, text in gw.core.gateway.events if kind == "routing"]
    assert any("learned step 'quality' of 'summarise' refitted on 48 labelled rows" in t for t in events)
    # a template without learned steps, optimizer off: still the optimizer's 409
    r = await gw.client.post(PREFIX + "/optimizer/runs", json={"template_id": "support"})
    assert r.status_code == 409


async def test_when_the_cheap_arm_answers_as_well_nothing_is_sent_past_it(make_gateway):
    """Every answer scored 1: every prompt's predicted gain is the same, and that tie keeps
    traffic on the cheapest arm rather than sending all of it past (strong_share is a cap)."""
    gw = await make_gateway(learned(strong_share=0.3))
    for prompt in MATHS[:12] + CHAT[:12]:
        for cid in ("cheap", "strong"):
            r = await gw.post(
                chat(prompt, model="summarise", variables=VARS, metadata={"combination_id": cid})
            )
            gw.flush()
            await gw.client.post(
                "/v1/feedback", json={"request_id": r.headers["x-rswitch-request-id"], "score": 1}
            )
    gw.flush()
    report = await step_of(gw).fit()
    assert report.share_past_cheapest == 0.0
    assert {(await routed(gw, p))[0] for p in MATHS[12:] + CHAT[12:]} == {"cheap"}
