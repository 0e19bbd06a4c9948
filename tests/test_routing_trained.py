"""Trained semantic routes (`method: trained`): the classifier `rswitch route fit --method trained`
learns over the real static encoder, its file (arrays + JSON, never a pickle), the step's
decisions and explanations, and the errors a missing, corrupt or mismatched file gives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import ConfigError, load_config, parse_config
from rswitch.providers.encoder import StaticEncoder
from rswitch.routing.base import Query
from rswitch.routing.fit import OUT_OF_SCOPE
from rswitch.routing.semantic import SemanticRoute, SemanticStep
from rswitch.routing.trained import Labelled, TrainedArtifactError, TrainedRoutes, split_held_out, train
from tests.conftest import chat
from tests.test_router_rules import COMBOS

runner = CliRunner()

ROUTES = {
    "combination:legal": [
        "review this contract clause",
        "is this agreement legally binding",
        "can my landlord evict me without notice",
        "what are my rights if my employer does not pay me",
        "explain the liability section of this lease",
        "do I need a lawyer to file a small claims case",
    ],
    "combination:weather": [
        "will it rain tomorrow",
        "weather forecast for the weekend",
        "how hot will it be on friday",
        "is there a storm coming tonight",
        "what is the temperature outside right now",
        "should I bring an umbrella today",
    ],
    "combination:cooking": [
        "how long should I boil an egg",
        "give me a recipe for pancakes",
        "what can I cook with rice and beans",
        "how do I make a tomato sauce from scratch",
        "what temperature do I roast a chicken at",
        "substitute for butter in cookies",
    ],
}
EXAMPLES = [
    ("check the termination clause of my contract", "combination:legal"),
    ("is a verbal agreement legally binding", "combination:legal"),
    ("can I sue my neighbour for damage to my fence", "combination:legal"),
    ("is it going to rain on saturday", "combination:weather"),
    ("what is the forecast for tomorrow", "combination:weather"),
    ("how cold will it be this weekend", "combination:weather"),
    ("how do I bake banana bread", "combination:cooking"),
    ("what spices go in a curry", "combination:cooking"),
    ("how long do I grill a steak", "combination:cooking"),
    ("recommend a good sci-fi novel", None),
    ("how do I reset my router password", None),
    ("what is the capital of australia", None),
    ("play some relaxing music", None),
    ("book a flight to madrid", None),
    ("how many miles is a marathon", None),
]
TARGETS = list(ROUTES)


@pytest.fixture(scope="module")
def encoder() -> StaticEncoder:
    return StaticEncoder()


def labelled(encoder: StaticEncoder, rows: list[tuple[str, str | None]]) -> Labelled:
    texts = [t for t, _ in rows]
    labels = [TARGETS.index(r) if r is not None else OUT_OF_SCOPE for _, r in rows]
    return Labelled(texts, encoder.encode(texts), np.array(labels))


@pytest.fixture(scope="module")
def model(encoder: StaticEncoder) -> TrainedRoutes:
    base = labelled(encoder, [(u, t) for t, us in ROUTES.items() for u in us])
    return train(base, labelled(encoder, EXAMPLES), TARGETS, "encoder:test")


def step_with(model: TrainedRoutes, encoder: StaticEncoder) -> SemanticStep:
    async def embed(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts)

    routes = [SemanticRoute(t, (t.split(":")[1],), 0.5, us) for t, us in ROUTES.items()]
    return SemanticStep("topics", routes, embed, "encoder:test", trained=model)


async def test_the_trained_step_routes_new_prompts_and_explains_with_the_runner_up(model, encoder):
    step = step_with(model, encoder)
    for text, target in [
        ("my landlord kept my deposit, can I take him to court", "combination:legal"),
        ("will it snow in the mountains tomorrow", "combination:weather"),
        ("what is a good recipe for lasagna", "combination:cooking"),
    ]:
        d = await step.decide(Query([{"role": "user", "content": text}]))
        assert not isinstance(d, str) and d is not None, (text, d)
        assert d.target == target
        assert d.score is not None and d.threshold == model.threshold and d.score >= model.threshold
        assert d.reason.startswith("trained (runner-up combination:")


async def test_an_out_of_scope_prompt_passes_saying_how_probable_the_best_route_was(model, encoder):
    step = step_with(model, encoder)
    d = await step.decide(Query([{"role": "user", "content": "translate good morning into japanese"}]))
    assert isinstance(d, str), d
    assert d.startswith("trained combination:") and f"< {model.threshold:.3f}, runner-up" in d


def test_request_time_ngrams_are_the_ones_scikit_learn_trained_on(model):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, vocabulary=model.vocab, dtype=np.float32
    )
    vec.idf_ = model.idf
    text = "Will it RAIN on the weekend?? rain rain"
    want = vec.transform([text]).toarray()[0]
    cols, w = model._ngrams(text)
    got = np.zeros(len(model.vocab), dtype=np.float32)
    got[cols] = w
    assert np.flatnonzero(want).tolist() == sorted(cols.tolist())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_save_and_load_give_the_same_probabilities(model, encoder, tmp_path):
    path = tmp_path / "topics.routes.npz"
    model.save(path)
    back = TrainedRoutes.load(path, encoder_id="encoder:test", routes=TARGETS)
    assert back.threshold == model.threshold and back.routes == TARGETS and back.oos_class
    texts = ["is this clause enforceable", "sunny tomorrow?", "bake sourdough"]
    vectors = encoder.encode(texts)
    np.testing.assert_allclose(
        back.probabilities_many(vectors, texts), model.probabilities_many(vectors, texts), rtol=1e-6
    )
    assert back.info["examples"] == len(EXAMPLES) and back.info["threshold_on"] == "5-fold"


def test_a_batch_gets_the_probabilities_each_prompt_gets_alone(model, encoder):
    texts = ["is this clause enforceable", "sunny tomorrow?", "", "!!!", "bake sourdough bread at home"] * 3
    vectors = encoder.encode(texts)
    alone = np.vstack([model.probabilities(v, t) for v, t in zip(vectors, texts, strict=True)])
    for chunk in (64, 4):  # one batch; batches cut mid-way
        batch = model.probabilities_many(vectors, texts, chunk=chunk)
        assert batch.shape == (len(texts), len(TARGETS))
        np.testing.assert_allclose(batch, alone, rtol=1e-5, atol=1e-7)


def test_a_mismatched_artifact_is_refused_with_what_to_do(model, tmp_path):
    path = tmp_path / "topics.routes.npz"
    model.save(path)
    with pytest.raises(TrainedArtifactError, match="re-run `rswitch route fit --method trained`") as e:
        TrainedRoutes.load(path, encoder_id="encoder:onnx:minilm", routes=TARGETS)
    assert str(path) in str(e.value) and "encoder:test" in str(e.value)
    with pytest.raises(TrainedArtifactError, match="trained for routes combination:legal"):
        TrainedRoutes.load(path, encoder_id="encoder:test", routes=TARGETS[:2])


def _rewrite(path, **arrays):
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data.update(arrays)
    with open(path, "wb") as fh:
        np.savez(fh, **data)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p, m: p.write_bytes(b"not a zip at all"), "not a readable trained-routes file"),
        (lambda p, m: p.write_bytes(p.read_bytes()[:200]), "not a readable trained-routes file"),
        (lambda p, m: _rewrite(p, coef=m.coef[:, :10]), "arrays do not fit together"),
        (lambda p, m: _rewrite(p, intercept=np.full(len(m.intercept), np.nan)), "not all finite"),
        (lambda p, m: _rewrite(p, meta=np.array("{oops")), "metadata is not JSON"),
        (lambda p, m: _rewrite(p, meta=np.array(json.dumps({"format": "x"}))), "format is not"),
        (lambda p, m: _rewrite(p, extra=np.zeros(2)), "not a trained-routes file"),
    ],
)
def test_a_corrupt_artifact_is_a_clear_error_naming_the_file(model, tmp_path, damage, message):
    path = tmp_path / "topics.routes.npz"
    model.save(path)
    damage(path, model)
    with pytest.raises(TrainedArtifactError, match=message) as e:
        TrainedRoutes.load(path)
    assert str(e.value).startswith(str(path))


class _Hostile:
    """Unpickling it creates the file `marker`: what any pickle can do when loaded (call anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_the_artifact_is_never_unpickled(model, tmp_path):
    path, marker = tmp_path / "topics.routes.npz", tmp_path / "ran"
    model.save(path)
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    data["meta"] = np.array([_Hostile(marker)], dtype=object)
    with open(path, "wb") as fh:
        np.savez(fh, **data)  # numpy pickles object arrays when saving: the hostile file exists
    assert not marker.exists()
    with pytest.raises(TrainedArtifactError, match="not a readable trained-routes file"):
        TrainedRoutes.load(path)
    assert not marker.exists()  # its code never ran
    with np.load(path, allow_pickle=True) as z:  # what loading it with pickles allowed would do
        z["meta"]
    assert marker.exists()


def test_training_needs_two_classes(encoder):
    only = labelled(encoder, [(u, "combination:legal") for u in ROUTES["combination:legal"]])
    with pytest.raises(ValueError, match="needs two classes"):
        train(only, only.take(np.arange(3)), TARGETS, "encoder:test")


def test_the_held_out_split_keeps_a_quarter_of_each_label():
    labels = np.array([0] * 8 + [1] * 4 + [OUT_OF_SCOPE] * 4 + [2])
    train_rows, held = split_held_out(labels)
    assert sorted(np.concatenate([train_rows, held]).tolist()) == list(range(len(labels)))
    assert [int((labels[held] == k).sum()) for k in (0, 1, OUT_OF_SCOPE, 2)] == [2, 1, 1, 0]


# -- config, the gateway and the CLI ------------------------------------------------------------

TOPICS = {
    "type": "semantic",
    "name": "topics",
    "encoder": {"provider": "enc", "model": "wordllama-256"},
    "routes": [{"route": t, "threshold": 0.5, "utterances": us} for t, us in ROUTES.items()],
}
CONFIG = {
    "model_providers": {"mock": {"type": "mock"}, "enc": {"type": "encoder", "models": ["wordllama-256"]}},
    "gateway": {
        "combinations": [
            {"id": name, "prompt": f"You help with {name}.", "model": "m", "provider": "mock"}
            for name in ("legal", "weather", "cooking", "general")
        ]
    },
    "routing": {"default": [TOPICS]},
}


@pytest.fixture
def setup(tmp_path):
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(dict(CONFIG, dataset={"base_path": str(tmp_path / "data" / "p")})))
    ex = tmp_path / "examples.jsonl"
    rows = [{"text": t, "route": r.split(":")[1] if r else "oos"} for t, r in EXAMPLES]
    ex.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return cfg_path, ex


def test_route_fit_method_trained_end_to_end(setup, tmp_path):
    cfg_path, ex = setup
    out = tmp_path / "fitted.yaml"
    r = runner.invoke(
        app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--method", "trained", "--output", str(out)]
    )
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "examples  15: 9 in scope, 6 out of scope" in r.output
    assert any(line.startswith("held out  5 examples") for line in lines)  # 1 of each route, 2 oos
    for name in ("similarity, current", "similarity, fitted", "trained"):
        assert any(line.strip().startswith(name) and "out-of-scope recall" in line for line in lines), name
    artifact = tmp_path / "topics.routes.npz"
    assert f"artifact  {artifact}" in r.output and artifact.is_file()
    written = yaml.safe_load(out.read_text())["routing"]["default"][0]
    assert written["method"] == "trained" and written["artifact"] == "topics.routes.npz"
    fitted = load_config(out)  # a config rswitch accepts, whose step loads the file
    assert fitted.routing.default[0].artifact == str(artifact)

    r = runner.invoke(app, ["route", "explain", "-c", str(out), "will it snow in the mountains tomorrow"])
    assert r.exit_code == 0, r.output
    assert "topics: trained (runner-up combination:" in r.output
    assert "decision    combination:weather → weather" in r.output
    r = runner.invoke(app, ["route", "explain", "-c", str(out), "translate good morning into japanese"])
    assert r.exit_code == 0, r.output
    assert "topics: pass (trained combination:" in r.output and "decision    pass" in r.output


def test_route_fit_trained_refuses_bad_options_and_changes_nothing(setup, tmp_path):
    cfg_path, ex = setup
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--method", "knn"])
    assert r.exit_code == 2 and "--method must be similarity or trained" in r.output
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--artifact", "x.npz"])
    assert r.exit_code == 2 and "--artifact is for --method trained" in r.output
    ex.write_text('{"text": "hi", "route": "legal"}\n')
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--method", "trained"])
    assert r.exit_code == 2 and "at least two examples" in r.output
    assert not list(tmp_path.glob("*.npz"))


def _trained_config(tmp_path, artifact: str | None = None):
    step = dict(TOPICS, method="trained", **({"artifact": artifact} if artifact else {}))
    cfg_path = tmp_path / "trained.yaml"
    data = dict(CONFIG, routing={"default": [step]}, dataset={"base_path": str(tmp_path / "data" / "p")})
    cfg_path.write_text(yaml.safe_dump(data))
    return cfg_path


def test_a_missing_or_mismatched_artifact_stops_the_start_naming_the_file(model, tmp_path):
    cfg_path = _trained_config(tmp_path, "models/topics.npz")
    r = runner.invoke(app, ["route", "explain", "-c", str(cfg_path), "hello"])
    where = tmp_path / "models" / "topics.npz"
    assert r.exit_code == 2 and "invalid config" in r.output and str(where) in r.output
    assert "run `rswitch route fit --method trained` to create it" in r.output
    model.save(where)  # trained on another encoder than the step's static one
    r = runner.invoke(app, ["route", "explain", "-c", str(cfg_path), "hello"])
    assert r.exit_code == 2 and str(where) in r.output
    assert (
        "trained on encoder 'encoder:test'" in r.output
        and "re-run `rswitch route fit --method trained`" in r.output
    )
    # and the gateway refuses to start on it
    from rswitch.core import Core

    with pytest.raises(ConfigError, match="routing step 'topics' artifact"):
        Core(load_config(cfg_path))


async def test_the_gateway_routes_with_the_trained_step_and_says_why(setup, tmp_path, make_gateway):
    cfg_path, ex = setup
    fit = ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--method", "trained"]
    r = await asyncio.to_thread(runner.invoke, app, fit)  # the CLI runs its own event loop
    assert r.exit_code == 0, r.output
    step = dict(TOPICS, method="trained", artifact=str(tmp_path / "topics.routes.npz"))
    gw = await make_gateway(
        {
            "model_providers": CONFIG["model_providers"],
            "gateway": {"combinations": COMBOS + CONFIG["gateway"]["combinations"]},
            "routing": {"default": [step]},
        }
    )
    resp = await gw.post(chat("is it going to be windy on the coast tomorrow", variables={"words": 5}))
    assert resp.status_code == 200
    assert resp.headers["x-rswitch-combination"] == "weather"
    route = resp.headers["x-rswitch-route"]
    assert route.startswith("topics: trained (runner-up combination:") and "-> combination:weather" in route


def test_method_is_similarity_unless_set_and_only_similarity_or_trained():
    base = dict(CONFIG, routing={"default": [TOPICS]})
    assert parse_config(base).routing.default[0].method == "similarity"
    with pytest.raises(ConfigError, match=r"routing.default\[0\].method"):
        parse_config(dict(CONFIG, routing={"default": [dict(TOPICS, method="knn")]}))


def test_a_huge_prompt_is_classified_on_its_first_characters(model, encoder):
    from rswitch.routing.trained import NGRAM_CHARS

    text = "will it rain on saturday in the hills? " * 5000  # ~200 kB
    [v] = encoder.encode([text[:1000]])
    np.testing.assert_allclose(model.probabilities(v, text), model.probabilities(v, text[:NGRAM_CHARS]))
    assert TARGETS[int(model.probabilities(v, text).argmax())] == "combination:weather"


def test_config_check_names_a_missing_or_mismatched_trained_file(model, tmp_path):
    cfg_path = _trained_config(tmp_path)
    where = tmp_path / "topics.routes.npz"
    r = runner.invoke(app, ["config", "check", str(cfg_path)])
    assert r.exit_code == 1, r.output
    assert f"routing.default[0].artifact: {where}: no trained routes file" in r.output
    two = TrainedRoutes(
        TARGETS[:2],
        model.encoder_id,
        model.threshold,
        True,
        model.coef[:3],
        model.intercept[:3],
        model.vocab,
        model.idf,
    )
    two.save(where)
    r = runner.invoke(app, ["config", "check", str(cfg_path)])
    assert r.exit_code == 1 and "trained for routes combination:legal, combination:weather, but" in r.output
    model.save(where)
    r = runner.invoke(app, ["config", "check", str(cfg_path)])
    assert r.exit_code == 0, r.output
