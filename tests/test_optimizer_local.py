"""MIPROv2 end to end on the real embedded model: SmolLM2-135M through llama.cpp, inside a running core."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rswitch.optimizer.mipro import Settings
from rswitch.optimizer.service import optimize

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parent.parent / "sample_prompts"
TEMPLATE = "intent-bench"

LOCAL = {
    "model_providers": {"local": {"type": "local", "local": {"n_ctx": 2048, "queue_size": 64}}},
    "template_dirs": [str(SAMPLES)],
    "gateway": {
        "combinations": [
            {"id": "intent-local", "template_id": TEMPLATE, "model": "smollm2", "provider": "local"}
        ]
    },
}

# Small: 40 rows → 20 train / 12 validation / 8 test; one instruction (the seed), three demo sets
# (zero-shot, labelled, one bootstrap attempt), four minibatch trials.
SETTINGS = Settings(
    seed=0,
    num_trials=4,
    num_instructions=1,
    num_demo_sets=3,
    max_labeled_demos=5,
    max_bootstrapped_demos=2,
    minibatch_size=5,
    full_eval_every=2,
    bootstrap_resamples=300,
    task_params={"temperature": 0, "max_tokens": 6, "stop": ["\n"]},
)


def labelled_rows(n: int) -> list[dict]:
    rows = []
    for line in (SAMPLES / TEMPLATE / "labelled.jsonl").read_text(encoding="utf-8").splitlines()[:n]:
        r = json.loads(line)
        rows.append(
            {
                "messages": [{"role": "user", "content": r["input"]}],
                "variables": r["variables"],
                "expected": r["expected"],
            }
        )
    return rows


async def test_optimizer_runs_on_the_local_model_and_promotes_or_keeps_with_a_reason(make_gateway):
    gw = await make_gateway(LOCAL)
    core = gw.core
    seed_prompt = core.registry.get(TEMPLATE)
    assert seed_prompt is not None and seed_prompt.version == 1 and "{labels}" in seed_prompt.template
    assert core.datasets.import_rows(TEMPLATE, labelled_rows(40)) == 40

    result, version = await optimize(
        core, TEMPLATE, settings=SETTINGS, combination_id="intent-local", evaluator="token_f1"
    )

    assert result.stopped is None, result.verdict
    gw.flush()
    trials = core.analytics.trials(result.run_id)
    assert len(trials) == len(result.trials) == SETTINGS.trials() == 4
    assert all(0.0 <= t["minibatch_score"] <= 1.0 for t in trials)
    # every model call went through the gateway, was counted, and was recorded as optimizer traffic
    calls = sum(result.calls.values())
    assert result.calls.get("task", 0) > 0 and calls == result.calls["task"]  # one instruction: no proposer
    optimizer_rows = core.analytics._conn.execute(
        "SELECT count(*), bool_and(success) FROM invocations WHERE kind = 'optimizer'"
    ).fetchone()
    assert optimizer_rows == (calls, True)
    assert 0.0 <= result.baseline_val <= 1.0 and 0.0 <= result.winner_val <= 1.0
    assert result.winner_val >= result.baseline_val  # the winner is the best full-validation score
    assert 0.0 <= result.incumbent_test <= 1.0 and 0.0 <= result.winner_test <= 1.0
    [run] = core.analytics.runs(TEMPLATE)
    assert run["run_id"] == result.run_id and run["verdict"] == result.verdict and run["calls"] == calls

    current = core.registry.get(TEMPLATE)
    if result.promote:
        assert version == 2 and current.version == 2 and run["promoted"] and run["new_version"] == 2
        assert result.verdict.startswith("promote: test") and result.ci[0] > 0
        winner = result.winner_candidate
        assert current.template == winner.instruction and current.demos == winner.demos
        assert current.provenance["run_id"] == result.run_id
        assert current.provenance["evaluator"] == "token_f1"
        assert current.provenance["previous_version"] == 1
        assert current.provenance["test_score"] == result.winner_test
        assert current.provenance["incumbent_test_score"] == result.incumbent_test
        # the gateway now serves the promoted prompt, demos and all, on the real model
        r = await gw.post(
            {
                "model": "intent-local",
                "messages": [{"role": "user", "content": "will it rain in boston tomorrow"}],
                "variables": {"labels": "weather, alarm, flight, calories, traffic"},
                "temperature": 0,
                "max_tokens": 6,
            }
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip()
    else:
        assert version is None and current.version == 1 and not run["promoted"]
        assert result.verdict.startswith("kept the incumbent: ")  # … and says why
        assert "no candidate beat it" in result.verdict or "does not exclude zero" in result.verdict
