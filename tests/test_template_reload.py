"""`rswitch template register` / `template rollback` take effect in a running gateway, without a
restart: the gateway notices changed manifests and serves them; a broken one keeps the old."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from rswitch.cli import app
from rswitch.templates import Template, TemplateRegistry
from tests.conftest import chat, merge
from tests.fakes import openai_fake

runner = CliRunner()
WAIT = 15.0  # seconds: the bound on waiting for the watcher (it looks every second)


@pytest.fixture
def upstream() -> Iterator[Any]:
    with openai_fake.running() as up:
        yield up


def config(tmp_path: Path, upstream: Any, override: dict[str, Any] | None = None) -> dict[str, Any]:
    return merge(
        {
            "model_providers": {
                "up": {"type": "openai", "base_url": upstream.base_url, "timeout_seconds": 5}
            },
            "templates": {"support": {"template": "You support {product}."}},
            "gateway": {
                "combinations": [
                    {"id": "support-a", "template_id": "support", "model": "gpt-4o", "provider": "up"}
                ]
            },
        },
        override or {},
    )


@pytest.fixture
async def served(make_gateway, tmp_path, upstream) -> Any:
    """A running in-process gateway, and the same config as a file for the CLI."""
    data = config(tmp_path, upstream)
    gw = await make_gateway(data)
    # the tests trigger the check the timer runs, so a tick never takes a change from under them
    await gw.core.template_watcher.stop()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **data,
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "cli-analytics.duckdb")},
            }
        )
    )
    gw.cli_config = str(path)
    return gw


def cli(gw: Any, *args: str) -> str:
    r = runner.invoke(app, [*args, "-c", gw.cli_config])
    assert r.exit_code == 0, r.output
    return r.output


def register(gw: Any, template_id: str, text: str, *extra: str) -> str:
    return cli(gw, "template", "register", "--template-id", template_id, "--prompt-text", text, *extra)


async def system_prompt_sent(gw: Any, upstream: Any, body: dict[str, Any]) -> str:
    r = await gw.post(body)
    assert r.status_code == 200, r.text
    return upstream.recorder.last["messages"][0]["content"]


def events(gw: Any, kind: str) -> list[str]:
    return [text for _, _, k, text in gw.core.gateway.events if k == kind]


async def test_a_new_template_registered_by_the_cli_is_served_without_restart(served, upstream):
    body = chat("hi", metadata={"template_id": "greeter"}, variables={"name": "Ada"})
    before = await served.post(body)
    assert before.status_code == 400 and "unknown template id 'greeter'" in before.text

    register(
        served, "greeter", "Greet {name} warmly.", "--default-model", "gpt-4o", "--default-provider", "up"
    )
    [tpl] = await served.core.template_watcher.check()  # what the watcher runs every second
    assert (tpl.id, tpl.version) == ("greeter", 1)
    assert await system_prompt_sent(served, upstream, body) == "Greet Ada warmly."
    assert "greeter" in {m["id"] for m in (await served.client.get("/v1/models")).json()["data"]}
    assert events(served, "template") == ["template 'greeter' version 1 is served now"]


async def test_a_new_version_and_a_rollback_replace_a_served_template(served, upstream):
    body = chat("hi", model="support-a", variables={"product": "Acme"})
    assert await system_prompt_sent(served, upstream, body) == "You support Acme."

    register(served, "support", "You sell {product}.")  # a registered version wins over the config's
    await served.core.template_watcher.check()
    assert await system_prompt_sent(served, upstream, body) == "You sell Acme."

    register(served, "support", "You repair {product}.")
    await served.core.template_watcher.check()
    assert await system_prompt_sent(served, upstream, body) == "You repair Acme."

    assert "a copy of version 1" in cli(served, "template", "rollback", "support", "1")
    [tpl] = await served.core.template_watcher.check()
    assert tpl.version == 3 and tpl.provenance["rollback_of"] == 1
    assert await system_prompt_sent(served, upstream, body) == "You sell Acme."


async def test_the_watcher_notices_a_registration_by_itself(served, upstream):
    served.core.template_watcher.start()  # as the gateway runs it: a check every second
    body = chat("hi", model="support-a", variables={"product": "Acme"})
    register(served, "support", "You cherish {product}.")
    deadline = time.monotonic() + WAIT
    while await system_prompt_sent(served, upstream, body) != "You cherish Acme.":
        assert time.monotonic() < deadline, "the running gateway never served the registered version"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ("id: support\ntemplate: [unclosed\n", "not valid YAML at line 3, column 1"),
        ("id: support\nname: no text\n", "'template' must be a non-empty string"),
        ("id: support\ntemplate: Hi {who}.\nvariables: [product]\n", "undeclared variable(s) who"),
        ("- just\n- a list\n", "a manifest must be a mapping"),
    ],
)
async def test_a_broken_manifest_is_reported_and_the_served_version_keeps_serving(
    served, upstream, manifest, problem
):
    body = chat("hi", model="support-a", variables={"product": "Acme"})
    register(served, "support", "You sell {product}.")
    await served.core.template_watcher.check()
    path = Path(served.core.registry.manifest_path("support"))
    path.write_text(manifest)

    assert await served.core.template_watcher.check() == []
    assert await system_prompt_sent(served, upstream, body) == "You sell Acme."
    [error] = events(served, "error")
    assert str(path) in error and problem in error and "version 1 keeps serving" in error
    assert "\n" not in error  # one line in the console's events pane
    assert await served.core.template_watcher.check() == []  # reported once, not every second
    assert len(events(served, "error")) == 1

    path.write_text(yaml.safe_dump({"id": "support", "template": "Fixed for {product}.", "version": 2}))
    [tpl] = await served.core.template_watcher.check()
    assert tpl.version == 2 and await system_prompt_sent(served, upstream, body) == "Fixed for Acme."


async def test_a_removed_manifest_keeps_serving_until_restart(served, upstream):
    body = chat("hi", model="support-a", variables={"product": "Acme"})
    register(served, "support", "You sell {product}.")
    await served.core.template_watcher.check()
    Path(served.core.registry.manifest_path("support")).unlink()

    assert await served.core.template_watcher.check() == []
    assert await system_prompt_sent(served, upstream, body) == "You sell Acme."
    assert events(served, "template")[-1].endswith("removed; its last version serves until restart")


async def test_the_gateways_own_write_backs_are_not_reported_as_changes(served):
    served.core.registry.register(Template(id="support", template="Optimized for {product}."))
    assert await served.core.template_watcher.check() == []
    assert served.core.registry.get("support").template == "Optimized for {product}."
    assert events(served, "template") == []


def test_an_older_read_never_replaces_a_newer_write(tmp_path):
    """A manifest written again between scan and apply waits for the next scan."""
    writer = TemplateRegistry(tmp_path)
    writer.register(Template(id="t", template="one"))
    served = TemplateRegistry(tmp_path)
    writer.register(Template(id="t", template="two"))
    changes = served.scan()
    writer.register(Template(id="t", template="three"))  # while "two" was being parsed
    assert served.apply(changes).parsed == [] and served.get("t").template == "one"
    [(_, _, _, tpl)] = served.apply(served.scan()).parsed
    assert tpl.template == "three" and served.get("t").template == "three"


async def test_template_dirs_are_watched_but_a_registered_version_wins(make_gateway, tmp_path, upstream):
    bundle = tmp_path / "bundle"
    (bundle / "faq").mkdir(parents=True)
    (bundle / "faq" / "manifest.yaml").write_text(
        yaml.safe_dump(
            {"id": "faq", "template": "Answer FAQs.", "default_model": "gpt-4o", "default_provider": "up"}
        )
    )
    data = config(tmp_path, upstream, {"template_dirs": [str(bundle)]})
    gw = await make_gateway(data)
    await gw.core.template_watcher.stop()
    body = chat("hi", model="faq")
    assert await system_prompt_sent(gw, upstream, body) == "Answer FAQs."

    (bundle / "faq" / "manifest.yaml").write_text(
        yaml.safe_dump(
            {
                "id": "faq",
                "template": "Answer FAQs briefly.",
                "default_model": "gpt-4o",
                "default_provider": "up",
            }
        )
    )
    await gw.core.template_watcher.check()
    assert await system_prompt_sent(gw, upstream, body) == "Answer FAQs briefly."

    gw.core.registry.register(
        Template(id="faq", template="Registered FAQ.", default_model="gpt-4o", default_provider="up")
    )
    (bundle / "faq" / "manifest.yaml").write_text(
        yaml.safe_dump(
            {"id": "faq", "template": "Bundled again.", "default_model": "gpt-4o", "default_provider": "up"}
        )
    )
    await gw.core.template_watcher.check()
    assert await system_prompt_sent(gw, upstream, body) == "Registered FAQ."


@pytest.mark.slow
def test_rswitch_serve_serves_what_the_cli_registers_and_rolls_back(tmp_path, upstream):
    """The whole thing as an operator does it: `rswitch serve` running, the CLI in another process."""
    from tests.test_real_server import rswitch_serve

    data = config(tmp_path, upstream)
    cfg = tmp_path / "config.yaml"

    def rswitch(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "rswitch", *args, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def served_text(url: str, body: dict[str, Any], want: str) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
            if r.status_code == 200 and upstream.recorder.last["messages"][0]["content"] == want:
                return
            assert time.monotonic() < deadline, f"never served {want!r}; last answer {r.status_code} {r.text}"
            time.sleep(0.1)

    with rswitch_serve(data, tmp_path) as (url, proc):  # it writes cfg, with the dataset paths
        body = chat("hi", metadata={"template_id": "greeter"}, variables={"name": "Ada"})
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=10).status_code == 400
        rswitch(
            "template", "register", "--template-id", "greeter", "--prompt-text", "Hello {name}.",
            "--default-model", "gpt-4o", "--default-provider", "up",
        )  # fmt: skip
        served_text(url, body, "Hello Ada.")
        rswitch(
            "template", "register", "--template-id", "greeter", "--prompt-text", "Goodbye {name}.",
            "--default-model", "gpt-4o", "--default-provider", "up",
        )  # fmt: skip
        served_text(url, body, "Goodbye Ada.")
        rswitch("template", "rollback", "greeter", "1")
        served_text(url, body, "Hello Ada.")
