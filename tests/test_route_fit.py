"""Threshold calibration for the semantic step: `rswitch.routing.fit` and `rswitch route fit`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import load_config
from rswitch.routing.fit import OUT_OF_SCOPE, evaluate, fit, predict

runner = CliRunner()


def test_predict_takes_the_nearest_route_only_at_or_above_its_threshold():
    scores = np.array([[0.9, 0.2], [0.3, 0.5], [0.4, 0.1]])
    assert predict(scores, np.array([0.5, 0.5])).tolist() == [0, 1, OUT_OF_SCOPE]
    assert predict(scores, np.array([0.95, 0.4])).tolist() == [OUT_OF_SCOPE, 1, OUT_OF_SCOPE]


def test_fit_finds_the_threshold_that_separates_in_scope_from_out_of_scope():
    rng = np.random.default_rng(0)
    # in scope: the right route scores ~0.8; out of scope: everything ~0.45
    n = 200
    labels = np.array([i % 3 for i in range(n)] + [OUT_OF_SCOPE] * 60)
    scores = rng.uniform(0.1, 0.4, size=(len(labels), 3))
    for i, lab in enumerate(labels):
        if lab != OUT_OF_SCOPE:
            scores[i, lab] = rng.uniform(0.65, 0.95)
        else:
            scores[i, rng.integers(3)] = rng.uniform(0.4, 0.55)
    th = fit(scores, labels)
    assert np.all((th > 0.55) & (th < 0.65))
    m = evaluate(scores, labels, th)
    assert m.in_scope_accuracy == 1.0 and m.oos_recall == 1.0
    # a threshold of zero would route every out-of-scope example somewhere
    assert evaluate(scores, labels, np.zeros(3)).oos_recall == 0.0


def test_per_route_thresholds_fit_routes_with_different_score_ranges():
    # route 0 matches high (0.9), route 1 low (0.6); out-of-scope queries land near each
    scores = np.array(
        [[0.9, 0.1]] * 10 + [[0.1, 0.6]] * 10 + [[0.75, 0.1]] * 10 + [[0.1, 0.45]] * 10, dtype=float
    )
    labels = np.array([0] * 10 + [1] * 10 + [OUT_OF_SCOPE] * 20)
    shared = evaluate(scores, labels, fit(scores, labels))
    own = fit(scores, labels, per_route=True)
    assert 0.75 < own[0] <= 0.9 and 0.45 < own[1] <= 0.6
    m = evaluate(scores, labels, own)
    assert m.accuracy == 1.0 and shared.accuracy < 1.0


def test_fit_rejects_an_unknown_objective():
    with pytest.raises(ValueError, match="balanced"):
        fit(np.zeros((1, 1)), np.array([0]), objective="f1")


# -- the CLI, over the real static encoder ------------------------------------------------------

CONFIG = {
    "model_providers": {
        "mock": {"type": "mock"},
        "enc": {"type": "encoder", "models": ["wordllama-256"]},
    },
    "gateway": {
        "combinations": [
            {"id": "legal", "prompt": "You are a lawyer.", "model": "m", "provider": "mock"},
            {"id": "weather", "prompt": "You forecast weather.", "model": "m", "provider": "mock"},
        ]
    },
    "routing": {
        "default": [
            {
                "type": "semantic",
                "name": "topics",
                "encoder": {"provider": "enc", "model": "wordllama-256"},
                "routes": [
                    {
                        "route": "legal",
                        "threshold": -1.0,
                        "utterances": ["review this contract clause", "is this agreement legally binding"],
                    },
                    {
                        "route": "weather",
                        "threshold": -1.0,
                        "utterances": ["will it rain tomorrow", "weather forecast for the weekend"],
                    },
                ],
            }
        ]
    },
}

EXAMPLES = [
    ("check the termination clause of my contract", "legal"),
    ("can my landlord break the lease agreement", "legal"),
    ("is a verbal agreement legally binding", "legal"),
    ("is it going to rain on saturday", "weather"),
    ("what is the forecast for tomorrow", "weather"),
    ("how cold will it be this weekend", "weather"),
    ("bake sourdough bread at home", None),
    ("recommend a good sci-fi novel", "oos"),
    ("how do i reset my router password", None),
]


@pytest.fixture
def setup(tmp_path):
    cfg = dict(CONFIG, dataset={"base_path": str(tmp_path / "data" / "prompts")})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    ex = tmp_path / "examples.jsonl"
    ex.write_text("\n".join(json.dumps({"text": t, "route": r}) for t, r in EXAMPLES) + "\n")
    return cfg_path, ex


def test_route_fit_reports_before_and_after_and_writes_a_valid_config(setup, tmp_path):
    cfg_path, ex = setup
    out = tmp_path / "fitted.yaml"
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "9: 6 in scope, 3 out of scope" in r.output
    # thresholds of -1 route everything somewhere: no out-of-scope recall before fitting
    current = next(line for line in r.output.splitlines() if line.startswith("current"))
    fitted = next(line for line in r.output.splitlines() if line.startswith("fitted"))
    assert "out-of-scope recall 0.0%" in current
    assert "out-of-scope recall 0.0%" not in fitted
    fitted_cfg = load_config(out)  # a config rswitch accepts
    new = [rt.threshold for rt in fitted_cfg.routing.default[0].routes]
    assert all(t > -1 for t in new)
    assert f"{new[0]:.3f}" in r.output
    assert yaml.safe_load(cfg_path.read_text())["routing"]["default"][0]["routes"][0]["threshold"] == -1.0


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "hi", "route": "billing"}'], "routes step 'topics' does not have: combination:billing"),
        (['{"text": "hi", "route": "legal"}', "{not json"], ":2: not valid JSON"),
        (['{"route": "legal"}'], ':1: each line needs "text"'),
        (['{"text": "hi", "route": 3}'], '"route" must be a string'),
        ([], "no examples"),
    ],
)
def test_route_fit_bad_examples_are_named_and_change_nothing(setup, lines, message):
    cfg_path, ex = setup
    ex.write_text("\n".join(lines))
    before = cfg_path.read_text()
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex)])
    assert r.exit_code == 2 and message in r.output, r.output
    assert cfg_path.read_text() == before


def test_route_fit_without_a_semantic_step_or_with_a_bad_objective(setup, tmp_path):
    cfg_path, ex = setup
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--step", "nope"])
    assert r.exit_code == 2 and "no semantic step named 'nope'" in r.output
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex), "--objective", "f1"])
    assert r.exit_code == 2 and "--objective must be one of balanced, accuracy" in r.output


def test_route_explain_runs_the_semantic_step_on_its_encoder(setup):
    cfg_path, _ = setup
    r = runner.invoke(app, ["route", "explain", "-c", str(cfg_path), "will it snow tomorrow"])
    assert r.exit_code == 0, r.output
    assert "topics: nearest combination:weather" in r.output
    assert "decision    combination:weather → weather" in r.output


def test_fit_can_reject_everything_when_everything_is_out_of_scope():
    scores = np.array([[0.3, 0.1], [0.5, 0.2], [0.9, 0.4]])
    labels = np.array([OUT_OF_SCOPE] * 3)
    m = evaluate(scores, labels, fit(scores, labels, objective="accuracy"))
    assert m.oos_recall == 1.0 and m.accuracy == 1.0


def test_route_fit_names_an_unknown_tier(setup):
    cfg_path, ex = setup
    ex.write_text('{"text": "hi", "route": "tier:nope"}\n')
    r = runner.invoke(app, ["route", "fit", "-c", str(cfg_path), "-e", str(ex)])
    assert r.exit_code == 2 and ":1: unknown tier in 'tier:nope'" in r.output
