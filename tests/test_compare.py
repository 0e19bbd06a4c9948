"""`rswitch compare`: a template's labelled rows replayed through candidate models, on mock
providers whose answers are right, wrong or right half the time, with known prices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

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
    line = next(x for x in render(result).splitlines() if "right/unlisted-model" in x)
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
