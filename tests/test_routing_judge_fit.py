"""`rswitch route fit --step NAME` on a judge step (issue #16 point 3): the judge scores labelled
prompts, the threshold is fitted (balanced, accuracy, or a target share to hard), the AUROC says
whether the judge ranks hard prompts above easy ones at all, and --output writes the config.

The judge is a fake OpenAI-compatible server on loopback answering with OpenAI's logprobs wire
format: the probability it puts on the score tokens gives each prompt a known expected score."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from aiohttp import web
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.config import parse_config
from rswitch.routing.judge_fit import auroc, fit_threshold
from tests.fakes.server import serve_app

runner = CliRunner()

# prompt -> the judge's expected score: like the 135M judge, it rates everything low (< 3),
# so the default threshold 3 never routes hard, but it does rank the hard prompts higher
HARD = {
    "prove that there are infinitely many primes": 2.6,
    "derive the closed form of the fibonacci sequence": 2.4,
    "design a lock-free queue and argue its correctness": 2.8,
    "explain the proof of the halting problem step by step": 2.2,
}
EASY = {
    "hi there": 1.1,
    "what is the capital of france": 1.3,
    "say thanks in german": 1.2,
    "what colour is the sky": 1.5,
    "tell me a short joke": 1.9,
    "how many days in a week": 1.4,
}


def logprobs_answer(score: float) -> dict[str, Any]:
    """A chat.completion whose first token's top_logprobs put mass on the two digits around
    `score` (and some on a non-digit, which the judge ignores), so the expected score is `score`."""
    low = min(int(math.floor(score)), 4)
    p_high = score - low
    top = [
        {"token": str(low), "logprob": math.log(max(1 - p_high, 1e-9) * 0.9), "bytes": None},
        {"token": str(low + 1), "logprob": math.log(max(p_high, 1e-9) * 0.9), "bytes": None},
        {"token": "The", "logprob": math.log(0.1), "bytes": None},
    ]
    return {
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "created": 0,
        "model": "judge-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": str(low), "refusal": None},
                "logprobs": {
                    "content": [{"token": str(low), "logprob": top[0]["logprob"], "top_logprobs": top}]
                },
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 1, "total_tokens": 31},
    }


def judge_app(scores: dict[str, float], seen: list[dict[str, Any]]) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if not body.get("logprobs") or body.get("top_logprobs", 0) < 5:
            return web.json_response(
                {"error": {"message": "logprobs required", "type": "invalid_request_error"}}, status=400
            )
        text = body["messages"][-1]["content"]
        if text not in scores:
            return web.json_response({"error": {"message": "overloaded", "type": "server_error"}}, status=500)
        return web.json_response(logprobs_answer(scores[text]))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture
def judge() -> Iterator[tuple[str, dict[str, float], list[dict[str, Any]]]]:
    scores: dict[str, float] = {**HARD, **EASY}
    seen: list[dict[str, Any]] = []
    with serve_app(judge_app(scores, seen)) as base:
        yield f"{base}/v1", scores, seen


def write_config(tmp_path: Path, base_url: str, easy: str | None = "tier:budget") -> Path:
    step: dict[str, Any] = {
        "type": "judge",
        "name": "difficulty",
        "provider": "judge",
        "model": "judge-model",
        "hard": "tier:premium",
        "threshold": 3.0,
        "timeout_seconds": 5,
    }
    if easy:
        step["easy"] = easy
    cfg = {
        "model_providers": {"mock": {"type": "mock"}, "judge": {"type": "openai", "base_url": base_url}},
        "gateway": {
            "combinations": [
                {"id": "strong", "template_id": "summarise", "model": "big", "provider": "mock"},
                {"id": "cheap", "template_id": "summarise", "model": "small", "provider": "mock"},
            ]
        },
        "templates": {"summarise": {"template": "Summarise in {words} words."}},
        "routing": {"tiers": {"premium": ["strong"], "budget": ["cheap"]}, "default": [step]},
        "dataset": {"base_path": str(tmp_path / "prompts")},
        "analytics": {"path": str(tmp_path / "analytics.duckdb")},
    }
    path = tmp_path / "rswitch.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_examples(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def labelled(easy_route: Any = "tier:budget") -> list[dict[str, Any]]:
    return [{"text": t, "route": "tier:premium"} for t in HARD] + [
        {"text": t, "route": easy_route} for t in EASY
    ]


def fit(*args: str) -> Any:
    return runner.invoke(app, ["route", "fit", *args])


def test_fit_sets_a_threshold_that_routes_the_hard_prompts_hard(tmp_path, judge):
    base_url, _, seen = judge
    cfg = write_config(tmp_path, base_url)
    ex = write_examples(tmp_path, labelled())
    out = tmp_path / "fitted.yaml"
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty", "--output", str(out))
    assert r.exit_code == 0, r.output
    assert "examples  10: 4 hard, 6 easy" in r.output
    assert "better than chance: AUROC 1.000" in r.output
    # the configured threshold 3 sends nothing hard; the fitted one separates them (between 1.9 and 2.2)
    assert "current   threshold 3.000   to hard 0.0%   accuracy 60.0%   hard recall 0.0%" in r.output
    assert "fitted    threshold 2.050   to hard 40.0%   accuracy 100.0%   hard recall 100.0%" in r.output
    assert len(seen) == 10 and all(b["max_tokens"] == 1 and b["top_logprobs"] == 20 for b in seen)
    written = yaml.safe_load(out.read_text())
    assert written["routing"]["default"][0]["threshold"] == 2.05
    assert yaml.safe_load(cfg.read_text())["routing"]["default"][0]["threshold"] == 3.0  # never touched
    parse_config(written)  # the written config is valid
    # and with it the chain routes a hard prompt to the hard tier
    r = runner.invoke(
        app, ["route", "explain", "-c", str(out), "prove that there are infinitely many primes"]
    )
    assert r.exit_code == 0, r.output
    assert "difficulty: hard score=2.600/2.050 -> tier:premium" in r.output


def test_a_judge_that_knows_nothing_is_called_no_better_than_chance(tmp_path, judge):
    base_url, scores, _ = judge
    for text in scores:  # it rates everything "1", as the 135M judge almost does
        scores[text] = 1.0
    cfg = write_config(tmp_path, base_url)
    ex = write_examples(tmp_path, labelled())
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty")
    assert r.exit_code == 0, r.output
    assert "no better than chance: AUROC 0.500" in r.output
    assert "use a stronger judge model" in r.output


def test_share_objective_sends_the_target_share_to_hard(tmp_path, judge):
    base_url, _, _ = judge
    cfg = write_config(tmp_path, base_url, easy=None)  # a judge that passes on easy prompts
    ex = write_examples(tmp_path, labelled(easy_route=None))  # no route = not hard
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty", "--objective", "share", "--share", "0.2")
    assert r.exit_code == 0, r.output
    # the two highest scores (2.8, 2.6): 20% of the prompts
    assert "fitted    threshold 2.500   to hard 20.0%   accuracy 80.0%   hard recall 50.0%" in r.output


def test_prompts_the_judge_cannot_score_are_left_out_and_counted(tmp_path, judge):
    base_url, _, _ = judge
    cfg = write_config(tmp_path, base_url)
    ex = write_examples(tmp_path, [*labelled(), {"text": "unknown to the judge", "route": "tier:budget"}])
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty")
    assert r.exit_code == 0, r.output
    assert "examples  11: 4 hard, 6 easy, 1 the judge gave no score for (left out)" in r.output


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, judge):
    base_url, _, seen = judge
    cfg = write_config(tmp_path, base_url)
    out = tmp_path / "fitted.yaml"
    ex = write_examples(tmp_path, [*labelled(), {"text": "x", "route": "tier:elsewhere"}])
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty", "--output", str(out))
    assert r.exit_code != 0 and "unknown tier in 'tier:elsewhere'" in r.output
    ex = write_examples(tmp_path, [*labelled(), {"text": "x", "route": "strong"}])
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty", "--output", str(out))
    assert r.exit_code != 0
    assert "judge step 'difficulty' does not route to: combination:strong" in r.output
    ex = write_examples(tmp_path, labelled())
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty", "--objective", "share")
    assert r.exit_code != 0 and "--objective share needs --share" in r.output
    r = fit("-c", str(cfg), "-e", str(ex), "--step", "difficulty", "--objective", "f1")
    assert r.exit_code != 0 and "balanced, accuracy, share" in r.output
    only_hard = write_examples(tmp_path, [{"text": t, "route": "tier:premium"} for t in HARD])
    r = fit("-c", str(cfg), "-e", str(only_hard), "--step", "difficulty", "--output", str(out))
    assert r.exit_code != 0 and "needs both hard and easy examples" in r.output
    assert not out.exists() and seen == [p for p in seen if p["messages"][-1]["content"] in HARD]


# -- the numbers behind it ------------------------------------------------------------------------


def test_auroc_counts_ties_half_and_knows_chance_from_signal():
    hard = np.array([True, True, False, False])
    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), hard).auroc == 1.0
    assert auroc(np.array([0.0, 1.0, 2.0, 3.0]), hard).auroc == 0.0
    assert auroc(np.array([1.0, 1.0, 1.0, 1.0]), hard).auroc == 0.5
    # pairs (hard, easy): 2>1, 2>0, 1=1 (a tie: half), 1>0
    assert auroc(np.array([2.0, 1.0, 1.0, 0.0]), hard).auroc == 3.5 / 4
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    noise = auroc(rng.random(400), labels)
    assert "no better than chance" in noise.verdict
    signal = auroc(rng.random(400) + labels * 0.5, labels)
    assert signal.auroc > 0.8 and "better than chance" in signal.verdict and "no better" not in signal.verdict


def test_balanced_objective_does_not_give_up_on_a_rare_hard_class():
    # 1 hard prompt in 10, scored highest: accuracy is 90% routing nothing hard, but balanced routes it
    scores = np.array([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 2.5])
    hard = np.array([False] * 9 + [True])
    best = fit_threshold(scores, hard, "balanced")
    assert best.hard_recall == 1.0 and best.accuracy == 1.0
    assert 1.8 < best.threshold <= 2.5


def test_semantic_and_judge_thresholds_break_ties_alike_in_the_middle():
    from rswitch.routing.fit import OUT_OF_SCOPE, evaluate, fit

    # in scope and out of scope alternate: three thresholds tie for the best balanced score
    semantic = np.array([[0.1], [0.3], [0.5], [0.7], [0.9], [0.95]])
    labels = np.array([OUT_OF_SCOPE, 0, OUT_OF_SCOPE, 0, OUT_OF_SCOPE, 0])
    judged = np.array([1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    hard = labels == 0
    [t] = fit(semantic, labels)
    j = fit_threshold(judged, hard, "balanced").threshold
    # both take the middle one of the tied splits (semantic 0.2 / 0.6 / 0.925, judge 1.75 / 2.75 / 3.75)
    assert 0.5 < t < 0.7 and 2.5 < j < 3.0
    assert evaluate(semantic, labels, np.array([t])).objective("balanced") == pytest.approx(2 / 3)
    # and a per-route fit keeps the shared threshold when no route's own is better
    assert fit(semantic, labels, per_route=True).tolist() == [t]
