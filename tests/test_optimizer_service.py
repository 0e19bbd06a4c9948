"""The optimizer against a live core: providers, datasets, registry, analytics, CLI."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.optimizer.mipro import Budget, Settings
from rswitch.optimizer.service import OptimizeError, optimize
from rswitch.providers.base import new_completion_id
from rswitch.templates import Template
from tests.test_mipro import MAGIC, PROPOSALS, rows, task_model

runner = CliRunner()

CONFIG = {
    "model_providers": {"task": {"type": "mock"}, "ideas": {"type": "mock"}},
    "templates": {
        "echo": {"template": "Repeat the user's text for {topic}."},
        "few": {"template": "Few {topic}."},
    },
    "gateway": {
        "combinations": [
            {
                "id": "echo-task",
                "template_id": "echo",
                "model": "task-model",
                "provider": "task",
                "is_primary": True,
            },
            {
                "id": "echo-ideas",
                "template_id": "echo",
                "model": "idea-model",
                "provider": "ideas",
                "weight": 0,
            },
            {"id": "few-task", "template_id": "few", "model": "task-model", "provider": "task"},
        ]
    },
}


def reply(text: str) -> dict:
    return {
        "id": new_completion_id(),
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def wire(core, proposals=PROPOSALS) -> None:
    async def task(call):
        return reply(task_model(call.messages, call.params))

    it = iter(proposals * 20)

    async def ideas(call):
        if "You describe datasets" in call.messages[0]["content"]:
            return reply("Short phrases, repeated back.")
        return reply(next(it))

    core.providers["task"].complete = task
    core.providers["ideas"].complete = ideas


@pytest.fixture
async def opt_gateway(make_gateway):
    gw = await make_gateway(CONFIG)
    examples = [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(40)]
    gw.core.datasets.import_rows("echo", examples)
    wire(gw.core)
    return gw


SETTINGS = dict(
    seed=3,
    num_trials=20,
    num_instructions=5,
    num_demo_sets=4,
    minibatch_size=5,
    full_eval_every=4,
    bootstrap_resamples=500,
)


async def test_optimize_promotes_a_new_version_and_records_everything(opt_gateway):
    core = opt_gateway.core
    result, version = await optimize(
        core, "echo", settings=Settings(**SETTINGS), evaluator="exact_match", proposer="echo-ideas"
    )
    assert result.promote and version == 2
    tpl = core.registry.get("echo")
    assert MAGIC in tpl.template and tpl.demos and tpl.provenance["run_id"] == result.run_id
    assert tpl.provenance["test_score"] == 1.0 and tpl.provenance["previous_version"] == 1
    # the gateway now serves the winner: its answers are right
    r = await opt_gateway.post(
        {
            "model": "echo-task",
            "messages": [{"role": "user", "content": "hello"}],
            "variables": {"topic": "t"},
        }
    )
    assert r.json()["choices"][0]["message"]["content"] == "HELLO"
    opt_gateway.flush()
    runs = core.analytics.runs("echo")
    assert runs[0]["run_id"] == result.run_id and runs[0]["promoted"] and runs[0]["new_version"] == 2
    assert len(core.analytics.trials(result.run_id)) == 20
    kinds = core.analytics._conn.execute(
        "SELECT kind, count(*) FROM invocations GROUP BY kind ORDER BY kind"
    ).fetchall()
    assert dict(kinds)["optimizer"] == sum(result.calls.values())
    assert (await opt_gateway.client.get("/v1/prompts/echo/stats")).json()[
        "total_requests"
    ] == 1  # production only
    system = (await opt_gateway.client.get("/v1/system/analytics")).json()
    assert system["optimizer_requests"] == sum(result.calls.values()) and system["total_requests"] == 1


async def test_dry_run_writes_nothing_and_rollback_restores(opt_gateway):
    core = opt_gateway.core
    result, version = await optimize(
        core,
        "echo",
        settings=Settings(**SETTINGS),
        evaluator="exact_match",
        proposer="echo-ideas",
        dry_run=True,
    )
    assert result.promote and version is None and "dry run" in result.verdict
    assert core.registry.get("echo").version == 1
    await optimize(
        core, "echo", settings=Settings(**SETTINGS), evaluator="exact_match", proposer="echo-ideas"
    )
    assert core.registry.get("echo").version == 2
    back = core.registry.rollback("echo", 1)
    assert back.version == 3 and back.template == "Repeat the user's text for {topic}." and back.demos == []
    assert back.provenance == {"rollback_of": 1, "previous_version": 2}


async def test_clear_errors(opt_gateway):
    core = opt_gateway.core
    with pytest.raises(OptimizeError, match="unknown template id 'ghost'"):
        await optimize(core, "ghost", settings=Settings(**SETTINGS))
    with pytest.raises(OptimizeError, match="unknown combination id 'nope'"):
        await optimize(core, "echo", settings=Settings(**SETTINGS), combination_id="nope")
    with pytest.raises(OptimizeError, match="serves template 'few', not 'echo'"):
        await optimize(core, "echo", settings=Settings(**SETTINGS), combination_id="few-task")
    with pytest.raises(OptimizeError, match="llm_judge evaluator needs --judge"):
        await optimize(core, "echo", settings=Settings(**SETTINGS), evaluator="llm_judge")
    with pytest.raises(OptimizeError, match="unknown evaluator|allowed"):
        await optimize(core, "echo", settings=Settings(**SETTINGS), evaluator="vibes")
    core.datasets.import_rows(
        "few", [{"messages": [{"role": "user", "content": f"q{i}"}], "expected": "a"} for i in range(4)]
    )
    with pytest.raises(OptimizeError, match="need at least 6 distinct labelled inputs.*have 4"):
        await optimize(core, "few", settings=Settings(**SETTINGS))


async def test_budget_stops_a_live_run(opt_gateway):
    result, version = await optimize(
        opt_gateway.core,
        "echo",
        settings=Settings(**SETTINGS),
        evaluator="exact_match",
        proposer="echo-ideas",
        budget=Budget(max_calls=25),
    )
    assert result.stopped == "budget" and version is None and sum(result.calls.values()) == 25


def test_cli_history_and_rollback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "dataset": {"base_path": str(tmp_path / "p")},
                "analytics": {"path": str(tmp_path / "a.duckdb")},
            }
        )
    )
    from rswitch.templates import TemplateRegistry

    reg = TemplateRegistry(tmp_path / "p")
    reg.register(Template(id="t", template="first {x}"))
    reg.register(
        Template(
            id="t",
            template="second {x}",
            provenance={
                "run_id": "abc",
                "evaluator": "exact_match",
                "incumbent_test_score": 0.2,
                "test_score": 0.9,
            },
        )
    )
    r = runner.invoke(app, ["template", "history", "t", "-c", str(cfg)])
    assert (
        r.exit_code == 0
        and "v1" in r.output
        and "v2 (current)" in r.output
        and "optimizer run abc" in r.output
    )
    assert "0.200 → 0.900" in r.output
    r = runner.invoke(app, ["template", "rollback", "t", "1", "-c", str(cfg)])
    assert r.exit_code == 0 and "now version 3, a copy of version 1" in r.output
    r = runner.invoke(app, ["template", "rollback", "t", "9", "-c", str(cfg)])
    assert r.exit_code != 0 and "no earlier version 9" in r.output


async def test_reference_combination_answers_serve_as_labels(make_gateway):
    config = {
        **CONFIG,
        "model_providers": {**CONFIG["model_providers"], "strong": {"type": "mock"}},
        "gateway": {
            "combinations": [
                *CONFIG["gateway"]["combinations"],
                {
                    "id": "echo-ref",
                    "template_id": "echo",
                    "model": "big-model",
                    "provider": "strong",
                    "weight": 0,
                },
            ],
            "optimization": {"reference_combinations": ["echo-ref"]},
        },
    }
    gw = await make_gateway(config)
    wire(gw.core)

    async def strong(call):
        return reply(call.messages[-1]["content"].upper())  # the strong model is right without help

    gw.core.providers["strong"].complete = strong
    for e in rows(40):  # unlabelled production traffic, served by the reference model
        r = await gw.post({"model": "echo-ref", "messages": e.messages, "variables": e.variables})
        assert r.status_code == 200
    result, version = await optimize(
        gw.core,
        "echo",
        settings=Settings(**SETTINGS),
        combination_id="echo-task",
        evaluator="exact_match",
        proposer="echo-ideas",
    )
    assert result.promote and version == 2 and MAGIC in gw.core.registry.get("echo").template


async def test_llm_judge_scores_through_a_judge_combination_and_counts_its_calls(opt_gateway):
    core = opt_gateway.core
    judged = []

    async def judge(call):
        judged.append(call)
        assert call.params["temperature"] == 0
        output = call.messages[-1]["content"].split("Actual output:")[-1]
        return reply("5" if any(w.isupper() and len(w) > 1 for w in output.split()) else "1")

    core.providers["ideas"].complete = judge
    result, _ = await optimize(
        core,
        "echo",
        settings=Settings(**{**SETTINGS, "num_instructions": 1}),
        evaluator="llm_judge",
        judge="echo-ideas",
    )
    assert result.calls["judge"] == len(judged) > 0
    assert result.stopped is None and result.verdict


def cli_config(tmp_path) -> str:
    """A config with one mock combination `echo-m` and 30 labelled rows in its dataset, for the CLI."""
    from rswitch.storage.datasets import DatasetStore

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "templates": {"echo": {"template": "Repeat the user's text for {topic}."}},
                "gateway": {
                    "combinations": [{"id": "echo-m", "template_id": "echo", "model": "m", "provider": "m"}]
                },
                "dataset": {"base_path": str(tmp_path / "p")},
                "analytics": {"path": str(tmp_path / "a.duckdb")},
            }
        )
    )
    store = DatasetStore(tmp_path / "p", 1000)
    store.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(30)]
    )
    store.close()
    return str(cfg)


def test_cli_optimize_reports_and_dry_run_writes_nothing(tmp_path):
    cfg = cli_config(tmp_path)
    r = runner.invoke(
        app,
        [
            "optimize",
            "echo",
            "-c",
            str(cfg),
            "--trials",
            "4",
            "--instructions",
            "2",
            "--demo-sets",
            "3",
            "--evaluator",
            "token_f1",
            "--dry-run",
        ],
    )
    assert r.exit_code == 0, r.output
    for line in ("trial(s)", "validation  seed", "test        seed", "verdict"):
        assert line in r.output
    r = runner.invoke(app, ["template", "history", "echo", "-c", str(cfg)])
    assert "v1 (current)" in r.output and "v2" not in r.output
    r = runner.invoke(app, ["optimize", "echo", "-c", str(cfg), "--auto", "extreme"])
    assert r.exit_code != 0 and "--auto must be one of light, medium, heavy" in r.output
