"""The background optimizer: reruns where labels arrived, off the request path, cancellable."""

from __future__ import annotations

import asyncio

from tests.test_mipro import MAGIC, PROPOSALS, rows, task_model
from tests.test_optimizer_service import CONFIG, reply

BACKGROUND = {
    **CONFIG,
    "gateway": {
        **CONFIG["gateway"],
        "optimization": {
            "enabled": True,
            "interval_seconds": 0.05,
            "min_new_labels": 10,
            "evaluator": "exact_match",
            "auto": "light",
        },
    },
}


def wire_one_model(core, delay: float = 0.0) -> None:
    """One provider answers both the task and the proposer's prompts (the default proposer is the task's model)."""
    it = iter(PROPOSALS * 50)

    async def complete(call):
        if delay:
            await asyncio.sleep(delay)
        system = call.messages[0]["content"]
        if "You describe datasets" in system:
            return reply("Short phrases, repeated back.")
        if "You write the instruction" in system:
            return reply(next(it))
        return reply(task_model(call.messages, call.params))

    core.providers["task"].complete = complete


async def wait_for_run(core, template_id: str, timeout: float = 60.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        runs = await asyncio.to_thread(core.analytics.runs, template_id)
        if runs:
            return runs[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no optimizer run was recorded")


async def test_background_run_promotes_while_the_gateway_keeps_serving(make_gateway):
    gw = await make_gateway(BACKGROUND)
    wire_one_model(gw.core)
    gw.core.datasets.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(40)]
    )
    served = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    run = None
    while run is None and loop.time() < deadline:
        r = await gw.post(
            {
                "model": "few-task",
                "messages": [{"role": "user", "content": "hi"}],
                "variables": {"topic": "t"},
            }
        )
        assert r.status_code == 200
        served += 1
        runs = await asyncio.to_thread(gw.core.analytics.runs, "echo")
        run = runs[0] if runs else None
        await asyncio.sleep(0.01)
    assert run is not None and served > 0
    assert run["promoted"] and run["new_version"] == 2
    assert MAGIC in gw.core.registry.get("echo").template
    status = (await gw.client.get("/status")).json()["optimizer"]
    assert status["enabled"] and status["last"]["run_id"] == run["run_id"]
    # nothing new since: the template is not due again
    assert "echo" not in gw.core.optimizer.due()


async def test_stopping_cancels_the_current_run_promptly(make_gateway):
    gw = await make_gateway(
        {
            **BACKGROUND,
            "gateway": {
                **BACKGROUND["gateway"],
                "optimization": {**BACKGROUND["gateway"]["optimization"], "auto": "heavy"},
            },
        }
    )
    wire_one_model(gw.core, delay=0.02)
    gw.core.datasets.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(60)]
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while gw.core.optimizer.running != "echo" and loop.time() < deadline:
        await asyncio.sleep(0.02)
    worker = gw.core.optimizer
    assert worker.running == "echo"
    await gw.core.stop()  # returns once the run notices the cancellation, not after the whole heavy run
    assert not worker._thread.is_alive()
    assert worker.last["verdict"] == "stopped: cancelled; nothing promoted"
    assert gw.core.registry.get("echo").version == 1


def test_watch_follows_a_requested_background_run_over_http(tmp_path, capsys):
    import pytest

    from rswitch.cli import watch_optimizer
    from rswitch.storage.datasets import DatasetStore
    from tests.test_real_server import rswitch_serve

    store = DatasetStore(tmp_path / "prompts", 1000)
    store.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(30)]
    )
    store.close()
    config = {
        "model_providers": {"m": {"type": "mock"}},
        "templates": {"echo": {"template": "Repeat the user's text for {topic}."}},
        "gateway": {
            "combinations": [{"id": "echo-m", "template_id": "echo", "model": "m", "provider": "m"}],
            "optimization": {
                "enabled": True,
                "interval_seconds": 3600,
                "min_new_labels": 1000,
                "auto": "light",
            },
        },
    }
    with rswitch_serve(config, tmp_path) as (url, _):
        watch_optimizer(url, "echo", request=True, poll=0.1, timeout=120)
        out = capsys.readouterr().out
        assert "trial   0" in out and "minibatch" in out
        assert "finished: " in out
        import httpx

        runs = httpx.get(url + "/v1/optimizer/runs", params={"template_id": "echo"}).json()["runs"]
        assert len(runs) == 1 and runs[0]["trials"] > 0
        r = httpx.post(url + "/v1/optimizer/runs", json={"template_id": "ghost"})
        assert r.status_code == 400 and "unknown template id 'ghost'" in r.json()["error"]["message"]
    _ = pytest
