"""A run names its stage wherever it is followed: `rswitch optimize`'s progress, the admin
status (and so `--watch` and the console), and the console's optimizer pane."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.tui.model import optimizer_lines
from tests.test_mipro import rows
from tests.test_optimizer_background import BACKGROUND
from tests.test_optimizer_service import cli_config, reply, task_model

runner = CliRunner()
PREFIX = "/admin/v1"


def stage_lines(output: str) -> list[str]:
    return [line.removesuffix("…") for line in output.splitlines() if line.endswith("…")]


def test_the_cli_prints_each_mipro_stage_once_in_order(tmp_path):
    cfg = cli_config(tmp_path)
    args = ["optimize", "echo", "-c", cfg, "--trials", "4", "--instructions", "2", "--demo-sets", "3"]
    r = runner.invoke(app, [*args, "--dry-run"])
    assert r.exit_code == 0, r.output
    stages = stage_lines(r.output)
    assert len(stages) == len(set(stages)), stages  # each once
    assert stages[:5] == [
        "loading examples",
        "bootstrapping demos",
        "summarising data",
        "proposing instructions",
        "scoring the current prompt",
    ]
    trials = [s for s in stages if s.startswith("trial ") and ":" not in s]
    assert trials == ["trial 1/4", "trial 2/4", "trial 3/4", "trial 4/4"]
    assert "trial 4/4: rescoring the best on validation" in stages
    assert stages[-1] == "testing the winner"
    assert r.output.index("testing the winner…") < r.output.index("verdict ")


def test_the_cli_prints_the_reflective_stages_once_in_order(tmp_path):
    cfg = cli_config(tmp_path)
    args = ["optimize", "echo", "-c", cfg, "--strategy", "reflective", "--trials", "2", "--dry-run"]
    r = runner.invoke(app, [*args, "--evaluator", "exact_match"])
    assert r.exit_code == 0, r.output
    stages = stage_lines(r.output)
    assert len(stages) == len(set(stages)), stages
    assert stages[:3] == [
        "loading examples",
        "scoring the current prompt",
        "round 1/2: running the current prompt on 3 training rows",
    ]
    # the mock answers "mock answer to: …", never the label: every round has failures to reflect on
    assert stages.index("round 1/2: reflecting on 3 failure(s)") < stages.index("testing the winner")
    assert any(s.startswith("round 2/2: ") for s in stages) and stages[-1] == "testing the winner"
    assert "verdict " in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "gepa"], "--strategy must be mipro or reflective; got 'gepa'"),
        (["--strategy", "reflective", "--instructions", "3"], "--instructions: only for --strategy mipro"),
        (["--pool-size", "2"], "--pool-size: only for --strategy reflective"),
    ],
)
def test_strategy_options_are_checked_before_anything_runs(tmp_path, args, message):
    r = runner.invoke(app, ["optimize", "echo", "-c", cli_config(tmp_path), *args])
    assert r.exit_code == 2 and message in r.output, r.output


async def test_the_admin_status_names_the_reflective_stage_while_the_proposer_thinks(make_gateway):
    config = {
        **BACKGROUND,
        "gateway": {
            **BACKGROUND["gateway"],
            "optimization": {
                **BACKGROUND["gateway"]["optimization"],
                "interval_seconds": 3600,  # it runs when asked
                "strategy": "reflective",
                "reflective": {"max_proposals": 2},
            },
        },
    }
    gw = await make_gateway(config)
    gw.core.datasets.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(40)]
    )
    thinking, released = asyncio.Event(), asyncio.Event()

    async def complete(call):
        if call.messages[0]["content"].startswith("You improve the instruction"):
            thinking.set()
            await released.wait()  # the proposer takes its time: the status must say so meanwhile
            return reply("Repeat the user's words for {topic}.")
        return reply(task_model(call.messages, call.params))

    gw.core.providers["task"].complete = complete
    started = await gw.client.post(PREFIX + "/optimizer/runs", json={"template_id": "echo"})
    assert started.status_code == 202, started.text
    await asyncio.wait_for(thinking.wait(), 60)
    status = (await gw.client.get(PREFIX + "/optimizer/runs", params={"template_id": "echo"})).json()
    opt = status["optimizer"]
    assert opt["running"] == "echo" and opt["strategy"] == "reflective"
    assert opt["stage"] == "round 1/2: reflecting on 3 failure(s)"
    assert opt["calls"] > 0
    released.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while gw.core.optimizer.running and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert gw.core.optimizer.running is None and gw.core.optimizer.status()["stage"] is None


def test_the_optimizer_pane_names_the_stage_and_the_strategy():
    opt = {
        "enabled": True,
        "running": "echo",
        "strategy": "reflective",
        "stage": "round 2/12: reflecting on 3 failure(s)",
        "calls": 40,
    }
    assert optimizer_lines(opt)[0].startswith(
        "optimizer: running 'echo' (reflective) — round 2/12: reflecting on 3 failure(s) (40 model calls so far)"
    )
    mipro = {**opt, "strategy": "mipro", "stage": "trial 3/12"}
    assert optimizer_lines(mipro)[0].startswith("optimizer: running 'echo' — trial 3/12 (40 model calls")
