"""`rswitch compare`: a template's labelled rows replayed through candidate models, on mock
providers whose answers are right, wrong or right half the time, with known prices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.admin.api import PREFIX
from rswitch.cli import app
from rswitch.optimizer import compare as cmp
from tests import test_storage_postgres

pg = test_storage_postgres.pg  # a fresh database on the session's real Postgres

runner = CliRunner()

ROWS = 40


def config(tmp: Path | None = None) -> dict[str, Any]:
    def mock(response: str | None = None, latency: float = 0.0, **extra: Any) -> dict[str, Any]:
        return {"type": "mock", "mock": {"response": response, "latency_ms": latency, **extra}}

    cfg: dict[str, Any] = {
        "model_providers": {
            "right": mock("yes"),  # every answer right
            "dear": mock("yes", 5),  # right too, and dearer and slower
            "wrong": mock("no"),  # every answer wrong
            "flaky": mock("yes", failure_rate=0.5, seed=1),  # right when it answers
            "nearly": mock("yes", failure_rate=0.05, seed=3),  # right, but for a rare failure
        },
        "pricing": {
            "right-model": {"input": 1.0, "output": 1.0},
            "dear-model": {"input": 30.0, "output": 60.0},
            "wrong-model": {"input": 0.1, "output": 0.1},
            "flaky-model": {"input": 0.5, "output": 0.5},
            "nearly-model": {"input": 0.2, "output": 0.2},
            "cheap-model": {"input": 0.01, "output": 0.01},
        },
        "templates": {"ask": {"template": "Answer yes or no about {topic}."}},
        "gateway": {
            "max_attempts": 1,
            "combinations": [
                {
                    "id": "ask-dear",
                    "template_id": "ask",
                    "model": "dear-model",
                    "provider": "dear",
                    "is_primary": True,
                },
                {"id": "ask-right", "template_id": "ask", "model": "right-model", "provider": "right"},
                {"id": "ask-wrong", "template_id": "ask", "model": "wrong-model", "provider": "wrong"},
                {"id": "ask-flaky", "template_id": "ask", "model": "flaky-model", "provider": "flaky"},
                {"id": "ask-nearly", "template_id": "ask", "model": "nearly-model", "provider": "nearly"},
            ],
        },
    }
    if tmp is not None:
        cfg["dataset"] = {"base_path": str(tmp / "prompts")}
        cfg["analytics"] = {"path": str(tmp / "a.duckdb")}
    return cfg


def with_upstream(up: Any) -> dict[str, Any]:
    """config() with an `ask-up` combination on a fake OpenAI upstream that records requests."""
    cfg = config()
    cfg["model_providers"]["up"] = {"type": "openai", "base_url": up.base_url, "api_key": "sk-test"}
    cfg["gateway"]["combinations"].append(
        {"id": "ask-up", "template_id": "ask", "model": "gpt-4o-mini", "provider": "up"}
    )
    return cfg


def labelled(n: int = ROWS) -> list[dict[str, Any]]:
    return [
        {
            "messages": [{"role": "user", "content": f"is {i} even?"}],
            "variables": {"topic": f"number {i}"},
            "expected": "yes",
        }
        for i in range(n)
    ]


@pytest.fixture
async def gw(make_gateway):
    gw = await make_gateway(config())
    gw.core.datasets.import_rows("ask", labelled())
    return gw


@pytest.fixture
async def core(make_gateway):
    gw = await make_gateway(config())
    gw.core.datasets.import_rows("ask", labelled())
    return gw.core


def by_id(result: cmp.Comparison) -> dict[str, cmp.Outcome]:
    return {o.id: o for o in result.outcomes}


async def test_the_table_verdicts_front_and_recommendation(core):
    who = cmp.contenders(core, "ask", ["ask-right", "ask-wrong"], [])
    rows = cmp.rows_for(core, "ask", "all", None, 0)
    result = await cmp.compare(core, "ask", who, rows, split_name="all", evaluator="exact_match")
    out = by_id(result)
    assert [o.id for o in result.outcomes] == ["ask-dear", "ask-right", "ask-wrong"]  # the incumbent first
    assert result.rows == ROWS and all(o.calls == ROWS for o in result.outcomes)
    assert out["ask-dear"].mean == 1.0 and out["ask-right"].mean == 1.0 and out["ask-wrong"].mean == 0.0
    assert out["ask-wrong"].verdict == "worse than the incumbent" and out["ask-wrong"].delta == -1.0
    assert out["ask-right"].verdict == "no significant difference"
    # the same answers for a thirtieth of the price: the right one is recommended, and says why
    assert out["ask-right"].cost_per_1k < out["ask-dear"].cost_per_1k / 10
    assert result.recommended == "ask-right"
    assert result.reason == "the best quality (1.000), significantly above every cheaper candidate"
    assert out["ask-right"].on_front and not out["ask-dear"].on_front  # dearer and slower, no better
    assert out["ask-dear"].p50_ms >= 5  # the mock's 5 ms


async def test_a_cheaper_candidate_within_noise_of_the_best_is_recommended(core):
    who = cmp.contenders(core, "ask", ["ask-right", "ask-nearly"], [])
    result = await cmp.compare(
        core, "ask", who, cmp.rows_for(core, "ask", "all", None, 0), evaluator="exact_match"
    )
    nearly = by_id(result)["ask-nearly"]
    assert 0 < nearly.failures <= 3 and nearly.mean < 1.0  # worse, but only by a failure or so
    assert result.recommended == "ask-nearly"
    assert result.reason.startswith(
        f"quality {nearly.mean:.3f} is not significantly below the best (ask-right"
    )


async def test_failures_count_as_wrong_answers_and_are_reported(core):
    who = cmp.contenders(core, "ask", ["ask-flaky"], [])
    result = await cmp.compare(
        core, "ask", who, cmp.rows_for(core, "ask", "all", None, 0), evaluator="exact_match"
    )
    flaky = by_id(result)["ask-flaky"]
    assert 0 < flaky.failures < ROWS and flaky.mean == pytest.approx(1 - flaky.failures / ROWS)
    assert len(flaky.ms) == ROWS - flaky.failures
    assert flaky.ci[0] < flaky.mean < flaky.ci[1]


async def test_budgets_stop_between_rows_so_every_candidate_answers_the_same_rows(core):
    who = cmp.contenders(core, "ask", ["ask-right", "ask-wrong"], [])
    rows = cmp.rows_for(core, "ask", "all", None, 0)
    result = await cmp.compare(core, "ask", who, rows, evaluator="exact_match", budget_calls=20)
    assert result.stopped == "budget" and result.rows == 6  # 6 rows x 3 candidates = 18 <= 20 < 21
    assert [o.calls for o in result.outcomes] == [6, 6, 6]
    # a cost cap: the dear model spends about $0.0002 a row
    result = await cmp.compare(core, "ask", who, rows, evaluator="exact_match", budget_cost=0.001)
    assert result.stopped == "budget" and 0 < result.rows < ROWS
    assert result.cost >= 0.001 and result.cost - by_id(result)["ask-dear"].cost / result.rows * 3 < 0.001


async def test_the_estimate_matches_what_the_run_spends(core):
    who = cmp.contenders(core, "ask", ["ask-right"], ["wrong/unpriced-model"])
    rows = cmp.rows_for(core, "ask", "all", 10, 0)
    guess = cmp.estimate(core, "ask", who, rows)
    assert guess.rows == 10 and guess.calls == 30
    assert guess.cost["wrong/unpriced-model"] is None  # no price known: said, not guessed
    result = await cmp.compare(core, "ask", who, rows, evaluator="exact_match")
    spent = by_id(result)["ask-dear"].cost
    assert guess.cost["ask-dear"] == pytest.approx(spent, rel=0.5)  # token estimates, not counts


async def test_eval_calls_are_recorded_as_eval_and_kept_out_of_live_stats(core):
    who = cmp.contenders(core, "ask", ["ask-right"], [])
    await cmp.compare(core, "ask", who, cmp.rows_for(core, "ask", "all", 5, 0), evaluator="exact_match")
    core.recorder.flush()
    kinds = (
        core.analytics._cursor().execute("SELECT kind, count(*) FROM invocations GROUP BY kind").fetchall()
    )
    assert dict(kinds) == {"eval": 10}
    assert core.gateway.metrics.window_stats("ask-right").requests == 0


async def test_runs_are_stored_and_listed(core):
    who = cmp.contenders(core, "ask", ["ask-wrong"], [])
    result = await cmp.compare(
        core, "ask", who, cmp.rows_for(core, "ask", "all", 8, 0), evaluator="exact_match"
    )
    core.analytics.record_compare(result.record())
    [run] = core.analytics.compare_runs("ask")
    assert run["run_id"] == result.run_id and run["rows"] == 8 and run["recommended"] == "ask-dear"
    assert [c["id"] for c in run["candidates"]] == ["ask-dear", "ask-wrong"]
    assert run["candidates"][1]["verdict"] == "worse than the incumbent"
    assert core.analytics.compare_runs("other") == []


async def test_bad_input_is_named(core):
    with pytest.raises(cmp.CompareError, match="unknown combination id 'nope'"):
        cmp.contenders(core, "ask", ["nope"], [])
    with pytest.raises(cmp.CompareError, match="unknown provider 'ghost'"):
        cmp.contenders(core, "ask", [], ["ghost/m"])
    with pytest.raises(cmp.CompareError, match="provider/model"):
        cmp.contenders(core, "ask", [], ["no-slash"])
    with pytest.raises(cmp.CompareError, match="unknown template id 'zzz'"):
        cmp.contenders(core, "zzz", ["ask-right"], [])
    with pytest.raises(cmp.CompareError, match="nothing to compare"):
        cmp.contenders(core, "ask", ["ask-dear"], [])
    with pytest.raises(cmp.CompareError, match="--split must be one of"):
        cmp.rows_for(core, "ask", "train", None, 0)


def write(tmp_path: Path) -> Path:
    from rswitch.storage.datasets import DatasetStore

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path)))
    store = DatasetStore(tmp_path / "prompts", 1000)
    store.import_rows("ask", labelled())
    store.close()
    return path


def test_cli_prints_the_table_and_records_the_run(tmp_path):
    cfg = write(tmp_path)
    r = runner.invoke(
        app,
        [
            "compare",
            "ask",
            "-c",
            str(cfg),
            "--candidates",
            "ask-right,ask-wrong",
            "--evaluator",
            "exact_match",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "8 row(s) of the test split x 3 candidate(s) = 24 call(s)" in r.output  # the newest fifth
    table = r.output[r.output.index("candidate") :]
    assert "ask-wrong" in table and "worse than the incumbent" in table
    assert "recommend ask-right:" in r.output
    from rswitch.storage.analytics import AnalyticsStore

    store = AnalyticsStore(tmp_path / "a.duckdb")
    try:
        assert [run["recommended"] for run in store.compare_runs("ask")] == ["ask-right"]
    finally:
        store.close()


def test_cli_dry_run_estimates_and_calls_nothing(tmp_path):
    cfg = write(tmp_path)
    r = runner.invoke(
        app,
        ["compare", "ask", "-c", str(cfg), "--models", "right/right-model", "--split", "all", "--dry-run"],
    )
    assert r.exit_code == 0, r.output
    assert "40 row(s) of the all split x 2 candidate(s) = 80 call(s), about $" in r.output
    assert "recommend" not in r.output
    from rswitch.storage.analytics import AnalyticsStore

    store = AnalyticsStore(tmp_path / "a.duckdb")
    try:
        assert store.compare_runs() == [] and store.count() == 0
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--candidates", "ask-zzz"], "unknown combination id 'ask-zzz'"),
        ([], "name what to compare"),
        (["--candidates", "ask-right", "--evaluator", "vibes"], "--evaluator must be one of"),
        (["--candidates", "ask-right", "--split", "train"], "--split must be one of test, all"),
    ],
)
def test_cli_refuses_bad_input(tmp_path, args, message):
    cfg = write(tmp_path)
    r = runner.invoke(app, ["compare", "ask", "-c", str(cfg), *args])
    assert r.exit_code == 2 and message in r.output


async def test_a_model_without_a_known_price_is_never_taken_for_the_cheapest(core):
    from rswitch.cli.compare import render

    who = cmp.contenders(core, "ask", ["ask-right"], ["right/unlisted-model"])
    result = await cmp.compare(
        core, "ask", who, cmp.rows_for(core, "ask", "all", None, 0), evaluator="exact_match"
    )
    unlisted = by_id(result)["right/unlisted-model"]
    assert not unlisted.priced and unlisted.mean == 1.0
    assert result.recommended == "ask-right"  # as good, and its price is known
    line = next(x for x in render(result.record()).splitlines() if "right/unlisted-model" in x)
    assert "unknown" in line


@pytest.mark.slow
async def test_on_postgres_a_compare_run_is_stored_in_the_shared_database(make_gateway, pg):
    cfg = dict(config(), storage={"backend": "postgres", "dsn": pg})
    gw = await make_gateway(cfg)
    core = gw.core
    core.datasets.import_rows("ask", labelled(12))
    who = cmp.contenders(core, "ask", ["ask-wrong"], [])
    result = await cmp.compare(
        core, "ask", who, cmp.rows_for(core, "ask", "all", None, 0), evaluator="exact_match"
    )
    core.analytics.record_compare(result.record())
    runs = [r for r in core.analytics.compare_runs("ask") if r["run_id"] == result.run_id]
    assert len(runs) == 1 and runs[0]["rows"] == 12 and runs[0]["recommended"] == "ask-dear"
    assert runs[0]["candidates"][1]["verdict"] == "worse than the incumbent"
    assert (
        core.analytics.compare_run(result.run_id)["rows"] == 12 and core.analytics.compare_run("nope") is None
    )


async def finished(gw: Any, run_id: str) -> dict[str, Any]:
    """The stored run, once the gateway's background comparison has written it (10 s at most)."""
    import asyncio
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        runs = (await gw.client.get(f"{PREFIX}/templates/ask/compare/runs")).json()
        done = [r for r in runs["runs"] if r["run_id"] == run_id]
        if done:
            return done[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"comparison {run_id} never finished")


def weights(gw: Any) -> dict[str, float]:
    return {c.id: c.weight for c in gw.core.gateway.combinations.values() if c.template_id == "ask"}


async def test_the_admin_api_runs_a_comparison_in_the_background_and_applies_it(gw):
    body = {
        "candidates": ["ask-right", "ask-wrong"],
        "split": "all",
        "evaluator": "exact_match",
        "apply": True,
    }
    r = await gw.client.post(f"{PREFIX}/templates/ask/compare", json=body)
    assert r.status_code == 202, r.text
    plan = r.json()
    assert plan["status"] == "running" and plan["rows"] == ROWS and plan["calls"] == 3 * ROWS
    assert plan["candidates"] == ["ask-dear", "ask-right", "ask-wrong"]
    run = await finished(gw, plan["run_id"])
    assert run["recommended"] == "ask-right" and run["rows"] == ROWS
    assert run["applied"].startswith("weights of 'ask': ask-dear 1 -> 0")
    # the recommended combination takes the traffic: an operator change, said in the event log
    assert weights(gw) == {
        "ask-dear": 0.0,
        "ask-right": 1.0,
        "ask-wrong": 0.0,
        "ask-flaky": 0.0,
        "ask-nearly": 0.0,
    }
    events = (await gw.client.get(f"{PREFIX}/snapshot")).json()["events"]
    assert any(e["kind"] == "operator" and "ask-right takes the traffic" in e["text"] for e in events)
    for _ in range(5):
        r = await gw.client.post(
            "/v1/chat/completions",
            json={
                "model": "ask",
                "messages": [{"role": "user", "content": "1?"}],
                "variables": {"topic": "x"},
            },
        )
        assert r.headers["x-rswitch-combination"] == "ask-right"
    # and undone by resetting the weights
    assert (await gw.client.post(f"{PREFIX}/combinations/reset")).status_code == 200
    assert set(weights(gw).values()) == {1.0}


async def test_the_admin_api_plans_refuses_and_runs_one_at_a_time(gw):
    url = f"{PREFIX}/templates/ask/compare"
    r = await gw.client.post(url, json={"candidates": ["ask-right"], "split": "all", "dry_run": True})
    assert r.status_code == 202 and r.json()["status"] == "planned" and r.json()["calls"] == 2 * ROWS
    assert (await gw.client.get(f"{url}/runs")).json() == {"running": None, "runs": []}
    for bad, message in [
        ({"candidates": ["zzz"]}, "unknown combination id 'zzz'"),
        ({"candidates": ["ask-right"], "split": "train"}, "--split must be one of"),
        ({"candidates": ["ask-right"], "evaluator": "vibes"}, "unknown evaluator 'vibes'"),
        ({"candidates": ["ask-right"], "rows": 0}, "rows"),
        ({"candidates": ["ask-right"], "colour": "red"}, "colour"),
    ]:
        r = await gw.client.post(url, json=bad)
        assert r.status_code == 400 and message in r.text, (bad, r.text)
    assert (
        await gw.client.post(f"{PREFIX}/templates/nope/compare", json={"candidates": ["ask-right"]})
    ).status_code == 404
    first = await gw.client.post(
        url, json={"candidates": ["ask-right"], "split": "all", "evaluator": "exact_match"}
    )
    assert first.status_code == 202
    busy = await gw.client.post(url, json={"candidates": ["ask-wrong"], "split": "all"})
    assert busy.status_code == 409 and first.json()["run_id"] in busy.text  # the dear model takes 5 ms a row
    running = (await gw.client.get(f"{url}/runs")).json()["running"]
    assert running["run_id"] == first.json()["run_id"] and 0 <= running["rows_done"] <= ROWS
    await finished(gw, first.json()["run_id"])


async def test_applying_a_model_that_is_no_combination_changes_nothing_and_says_what_to_add(core):
    who = cmp.contenders(core, "ask", [], ["right/cheap-model"])
    result = await cmp.compare(
        core, "ask", who, cmp.rows_for(core, "ask", "all", 10, 0), evaluator="exact_match"
    )
    assert result.recommended == "right/cheap-model"  # as right as the incumbent, for a hundredth
    text = cmp.apply(core, result.record())
    assert text.startswith("nothing applied: right/cheap-model is not a combination of 'ask'")
    assert "provider: right, model: cheap-model" in text
    assert set(weights_of(core).values()) == {1.0}


def weights_of(core: Any) -> dict[str, float]:
    return {c.id: c.weight for c in core.gateway.combinations.values() if c.template_id == "ask"}


def test_cli_apply_needs_a_running_gateway(tmp_path):
    cfg = write(tmp_path)
    r = runner.invoke(app, ["compare", "ask", "-c", str(cfg), "--candidates", "ask-right", "--apply"])
    assert r.exit_code == 2 and "--apply changes a running gateway's weights" in r.output


@pytest.mark.slow
def test_cli_through_a_running_gateway_follows_the_run_and_applies_it(tmp_path):
    import httpx

    from rswitch.storage.datasets import DatasetStore
    from tests.test_real_server import rswitch_serve

    store = DatasetStore(tmp_path / "prompts", 1000)  # where rswitch_serve points the gateway
    store.import_rows("ask", labelled())
    store.close()
    with rswitch_serve(config(), tmp_path) as (url, _proc):
        r = runner.invoke(
            app,
            [
                "compare", "ask", "-c", str(tmp_path / "config.yaml"), "--candidates", "ask-right,ask-wrong",
                "--split", "all", "--evaluator", "exact_match", "--apply",
            ],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert f"through the running gateway at {url}" in r.output
        assert "40 row(s) of the all split x 3 candidate(s) = 120 call(s)" in r.output
        assert (
            "recommend ask-right:" in r.output and "applied   weights of 'ask': ask-dear 1 -> 0" in r.output
        )
        status = httpx.get(url + "/status").json()
        served = {c["id"]: c["weight"] for c in status["combinations"] if c["id"].startswith("ask-")}
        assert served["ask-right"] == 1.0 and served["ask-dear"] == 0.0


async def test_an_earlier_version_of_the_prompt_is_a_candidate_of_its_own(make_gateway):
    from rswitch.templates import Template
    from tests.fakes import openai_fake

    with openai_fake.running() as up:
        gw = await make_gateway(with_upstream(up))
        core = gw.core
        core.datasets.import_rows("ask", labelled(6))
        core.registry.register(Template(id="ask", template="Answer in one word about {topic}."))
        assert core.registry.get("ask").version == 2
        who = cmp.contenders(core, "ask", ["ask-up@v1", "ask-up@v2"], [])
        assert [c.id for c in who] == ["ask-dear", "ask-up@v1", "ask-up@v2"]
        await cmp.compare(
            core, "ask", who, cmp.rows_for(core, "ask", "all", None, 0), evaluator="exact_match"
        )
        systems = [r["messages"][0]["content"] for r in up.recorder.requests if "messages" in r]
        assert systems.count("Answer yes or no about number 0.") == 1  # v1's prompt, rendered
        assert systems.count("Answer in one word about number 0.") == 1  # v2's, the current one
        with pytest.raises(cmp.CompareError, match=r"has no version 7 \(versions: 1, 2\)"):
            cmp.contenders(core, "ask", ["ask-up@v7"], [])
        with pytest.raises(cmp.CompareError, match="after @ comes a template version"):
            cmp.contenders(core, "ask", ["ask-up@latest"], [])


async def test_a_finished_comparison_is_applied_afterwards_once_looked_at(gw):
    body = {"candidates": ["ask-right"], "split": "all", "evaluator": "exact_match"}
    run_id = (await gw.client.post(f"{PREFIX}/templates/ask/compare", json=body)).json()["run_id"]
    run = await finished(gw, run_id)
    assert run["recommended"] == "ask-right" and run["applied"] is None
    assert set(weights(gw).values()) == {1.0}  # looked at, nothing changed yet
    r = await gw.client.post(f"{PREFIX}/templates/ask/compare/runs/{run_id}/apply")
    assert r.status_code == 200, r.text
    assert r.json()["applied"].startswith("weights of 'ask': ask-dear 1 -> 0")
    assert weights(gw)["ask-right"] == 1.0 and weights(gw)["ask-dear"] == 0.0
    assert (await finished(gw, run_id))["applied"] == r.json()["applied"]  # the stored run says so
    again = await gw.client.post(f"{PREFIX}/templates/ask/compare/runs/{run_id}/apply")
    assert again.json()["applied"] == "nothing to change: ask-right already takes all of 'ask''s traffic"
    missing = await gw.client.post(f"{PREFIX}/templates/ask/compare/runs/nope/apply")
    assert missing.status_code == 404 and "no comparison 'nope'" in missing.text


async def test_replayed_calls_ask_for_a_bounded_answer_at_temperature_0(make_gateway):
    from tests.fakes import openai_fake

    with openai_fake.running() as up:
        gw = await make_gateway(with_upstream(up))
        gw.core.datasets.import_rows("ask", labelled(4))
        who = cmp.contenders(gw.core, "ask", ["ask-up"], [])
        await cmp.compare(
            gw.core, "ask", who, cmp.rows_for(gw.core, "ask", "all", None, 0), evaluator="exact_match"
        )
        sent = [r for r in up.recorder.requests if "messages" in r]
        assert len(sent) == 4
        # "yes" is one token: twice that and 16 more
        assert {(r["temperature"], r["max_tokens"]) for r in sent} == {
            (0, 2 * cmp.estimate_tokens("yes") + 16)
        }


@pytest.mark.slow
async def test_compare_on_the_embedded_model_against_a_mock_that_knows_the_label(make_gateway):
    """The real SmolLM2-135M through llama.cpp beside a mock answering every row's label: the
    table has both, the mock is significantly better, and the local calls are eval traffic."""
    from tests.test_optimizer_local import LOCAL, TEMPLATE, labelled_rows

    cfg = {
        **LOCAL,
        "model_providers": {
            **LOCAL["model_providers"],
            "oracle": {"type": "mock", "mock": {"response": "weather"}},
        },
        "pricing": {"oracle-model": {"input": 2.5, "output": 10.0}},
    }
    gw = await make_gateway(cfg)
    core = gw.core
    rows = [r for r in labelled_rows(200) if r["expected"] == "weather"][:8]  # the mock's answer is right
    assert len(rows) == 8 and core.datasets.import_rows(TEMPLATE, rows) == 8
    who = cmp.contenders(core, TEMPLATE, [], ["oracle/oracle-model"])
    result = await cmp.compare(
        core, TEMPLATE, who, cmp.rows_for(core, TEMPLATE, "all", None, 0), evaluator="exact_match"
    )
    local, oracle = result.outcomes
    assert (local.id, oracle.id) == ("intent-local", "oracle/oracle-model")
    assert oracle.mean == 1.0 and local.calls == 8 and local.failures == 0 and local.p50_ms > 0
    assert local.mean < 1.0 or oracle.verdict == "no significant difference"  # 135M, seed prompt
    assert local.cost == 0.0 and local.priced  # in-process: nothing to pay, and said so
    gw.flush()
    eval_rows = core.analytics._conn.execute(
        "SELECT provider, count(*) FROM invocations WHERE kind = 'eval' GROUP BY provider ORDER BY provider"
    ).fetchall()
    assert eval_rows == [("local", 8), ("oracle", 8)]
    from rswitch.cli.compare import render

    table = render(result.record())
    assert "intent-local" in table and "oracle/oracle-model" in table and "recommend" in table
