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


# -- the fit's choice, the file, and one refit among processes ----------------------------------


def _rows(texts, cheap, strong):
    """Each prompt answered by both arms, each answer scored (as `record_with_feedback` records)."""
    rows = []
    for text, qc, qs in zip(texts, cheap, strong, strict=True):
        for cid, q in (("cheap", qc), ("strong", qs)):
            rows.append(
                {
                    "id": len(rows) + 1,
                    "combination_id": cid,
                    "messages": [{"role": "user", "content": text}],
                    "label_score": float(q),
                }
            )
    return rows


def _around(directions, per, seed):
    """`per` unit vectors near each direction (16-d), and which direction each is near."""
    rng = np.random.default_rng(seed)
    which = np.repeat(np.arange(len(directions)), per)
    vectors = np.asarray(directions, dtype=float)[which] + 0.25 * rng.standard_normal((len(which), 16))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), which


def _fit(texts, vectors, cheap, strong, **kw):
    from rswitch.routing.learned import fit_model, labelled_rows

    data = labelled_rows(_rows(texts, cheap, strong), ["cheap", "strong"])
    return fit_model(data, vectors, ["cheap", "strong"], "encoder:test", **kw)


def test_the_fit_picks_neighbours_or_words_by_how_well_they_rank_held_out_prompts():
    """Two kinds of traffic: where the strong arm helps is a cluster pattern no linear model of the
    embedding can draw (both ends of one axis), or a word in the prompt with embeddings that say
    nothing. Cross-validation picks the neighbour blend for the first, a word model for the second,
    and each routes new prompts of the helped kind past the cheap arm."""
    e = np.eye(16)
    vectors, which = _around([e[0], -e[0], e[1], -e[1]], 30, seed=1)
    helped = which < 2  # both ends of axis 0
    texts = [f"prompt number {i}" for i in range(len(which))]
    model = _fit(texts, vectors, np.where(helped, 0.0, 1.0), np.ones(len(which)))
    assert model.objective == "cv_apgr" and model.blend > 0, model.cv
    assert model.cv[min(model.cv, key=lambda k: -model.cv[k])] == max(model.cv.values())
    new, new_which = _around([e[0], -e[0], e[1], -e[1]], 5, seed=2)
    pred = model.predict(new, [f"new prompt {i}" for i in range(len(new))])
    gain = pred[:, 1] - pred[:, 0]
    assert gain[new_which < 2].min() > gain[new_which >= 2].max()

    rng = np.random.default_rng(3)
    noise = rng.standard_normal((120, 16))
    topic = np.arange(120) % 2 == 0
    texts = [f"{'integrate' if t else 'greet'} item {i} please" for i, t in enumerate(topic)]
    model = _fit(texts, noise, np.where(topic, 0.0, 1.0), np.ones(120))
    assert "words" in model.features or "chars" in model.features, model.cv
    assert model.blend < 1
    pred = model.predict(rng.standard_normal((2, 16)), ["integrate item 999 please", "greet item 999 please"])
    assert pred[0, 1] - pred[0, 0] > pred[1, 1] - pred[1, 0]


def _blended_model():
    e = np.eye(16)
    vectors, which = _around([e[0], -e[0], e[1], -e[1]], 30, seed=1)
    texts = [f"prompt number {i}" for i in range(len(which))]
    return _fit(texts, vectors, np.where(which < 2, 0.0, 1.0), np.ones(len(which)), count_at_fit=321)


def _rewrite(path, **meta_changes):
    """The model file with its meta record changed (None: key removed)."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    for key, value in meta_changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_a_blended_model_file_loads_as_it_was_saved_and_an_older_file_still_loads(tmp_path):
    model = _blended_model()
    assert model.blend > 0 and model.knn_k > 0
    path = tmp_path / "m.npz"
    model.save(path)
    again = LearnedModel.load(path, ["cheap", "strong"], "encoder:test")
    assert (again.knn_k, again.blend, again.count_at_fit) == (model.knn_k, model.blend, 321)
    probe = np.random.default_rng(5).standard_normal((6, 16))
    texts = [f"probe {i}" for i in range(6)]
    assert np.allclose(again.predict(probe, texts), model.predict(probe, texts), atol=1e-5)
    # a file of the first format (no blend) loads, and routes with its ridge alone
    _rewrite(path, format="rswitch-learned-router/1", knn_k=None, blend=None, count_at_fit=None)
    old = LearnedModel.load(path, ["cheap", "strong"], "encoder:test")
    assert old.blend == 0 and old.count_at_fit is None
    assert np.allclose(old.predict(probe, texts), model.predict_linear(probe, texts), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"blend": 1.5}, "neighbour blend 1.5 with knn_k"),
        ({"blend": 0.5, "knn_k": 0}, "k in 1..120"),
        ({"blend": 0.5, "knn_k": 10_000}, "k in 1..120"),
        ({"blend": "half"}, "neighbour blend 'half'"),
        ({"count_at_fit": -3}, "count_at_fit -3 is not a row count"),
        ({"format": "rswitch-learned-router/9"}, r"expected one of .*: refit it \(rswitch route fit --step"),
    ],
)
def test_a_model_file_with_a_bad_blend_or_format_is_refused(tmp_path, change, error):
    path = tmp_path / "m.npz"
    _blended_model().save(path)
    _rewrite(path, **change)
    with pytest.raises(ArtifactError, match=error):
        LearnedModel.load(path)


async def test_with_several_processes_one_refits_and_the_others_load_its_file(make_gateway, monkeypatch):
    """`serve --workers N`: every process has the step and counts the labels, but one refits the
    shared model file (the one holding the lock beside it); the others load that file."""
    import rswitch.routing.learned as learned_module
    from rswitch.routing.learned import _try_lock

    fits = []
    real_fit = learned_module.fit_model
    monkeypatch.setattr(learned_module, "fit_model", lambda *a, **kw: fits.append(1) or real_fit(*a, **kw))
    config = learned(refit={"every_labels": 10, "check_seconds": 3600})  # checks driven by the test
    one, two = await make_gateway(config), await make_gateway(config)
    first, second = step_of(one), step_of(two)
    assert first.path == second.path
    await record_with_feedback(one, MATHS[:12] + CHAT[:12])
    # another process is refitting (it holds the lock): this one leaves it to it
    other = _try_lock(first.lock_path)
    assert other is not None
    assert await second.maybe_refit() is None and not fits and not first.path.exists()
    other.close()
    # the lock free, one process refits; the other then loads its file instead of fitting again
    report = await first.maybe_refit()
    assert report is not None and len(fits) == 1
    assert await second.maybe_refit() is None and len(fits) == 1
    assert second.model is not None and second.model.fitted_at == first.model.fitted_at
    assert (await routed(two, MATHS[-1]))[0] == "strong"
    # more labels: whichever process checks first refits, once, and the other follows
    await record_with_feedback(one, MATHS[12:18] + CHAT[12:18])
    assert await second.maybe_refit() is not None and len(fits) == 2
    assert await first.maybe_refit() is None and len(fits) == 2
    assert first.model.fitted_at == second.model.fitted_at and first.model.n_labels == 72
