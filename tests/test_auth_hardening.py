"""Who may call, hardened: DNS rebinding on the key-free loopback setup, per-key token estimates
given back when a call fails or its client leaves, and template-limited keys on embeddings and on
the stats and optimizer views. Through real requests to the ASGI app."""

from __future__ import annotations

import threading

import pytest
from typer.testing import CliRunner

from rswitch.auth import hash_key, new_key
from rswitch.cli import app as rswitch_app
from rswitch.config import ConfigError
from tests.conftest import make_config

APP_KEY = new_key()
SUM_KEY = new_key()
ADMIN_KEY = new_key()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# -- rswitch key create ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["shop\n", "shop\nevil", "\nshop", "shop "])
def test_key_create_refuses_a_name_with_a_newline_or_space(name):
    r = CliRunner().invoke(rswitch_app, ["key", "create", name])
    assert r.exit_code == 2
    assert "key name must be" in r.output
    assert "rsk-" not in r.output  # no key was made


def test_key_create_names_are_the_names_the_config_takes(tmp_path):
    r = CliRunner().invoke(rswitch_app, ["key", "create", "shop.eu@team-1"])
    assert r.exit_code == 0, r.output
    with pytest.raises(ConfigError):  # so a name refused here is refused by the config too
        make_config(
            tmp_path, {"gateway": {"auth": {"keys": [{"name": "shop\n", "hash": hash_key(APP_KEY)}]}}}
        )


# -- DNS rebinding -----------------------------------------------------------------------------

EVIL = {"host": "evil.example:18082", "origin": "http://evil.example:18082"}
SUPPORT = {"product": "Acme", "tone": "kind"}


def support_chat(**extra):
    body = {"messages": [{"role": "user", "content": "hi"}], "variables": SUPPORT}
    return {**body, "metadata": {"template_id": "support"}, **extra}


async def test_a_rebound_host_is_refused_without_keys(gateway):
    """A web page whose name now points at 127.0.0.1 sends Host and Origin of its own: refused
    everywhere, before any route (and nothing is recorded or labelled)."""
    served = await gateway.post(support_chat())
    label = {"request_id": served.headers["x-rswitch-request-id"], "score": 1}
    answers = [
        await gateway.client.post("/v1/chat/completions", json=support_chat(), headers=EVIL),
        await gateway.client.post("/v1/chat/completions", json=support_chat(stream=True), headers=EVIL),
        await gateway.client.get("/status", headers=EVIL),
        await gateway.client.post("/v1/feedback", json=label, headers=EVIL),
        await gateway.client.post("/v1/optimizer/runs", json={"template_id": "support"}, headers=EVIL),
        await gateway.client.get("/v1/models", headers={"host": "127.evil.example"}),
        await gateway.client.get("/status", headers={"host": "localhost.evil.example"}),
    ]
    for r in answers:
        assert r.status_code == 403, r.request.url
        err = r.json()["error"]
        assert err["code"] == "host_not_allowed" and err["type"] == "permission_error"
        assert "DNS rebinding" in err["message"]
    assert "'evil.example:18082'" in answers[0].json()["error"]["message"]
    assert len(gateway.analytics_rows()) == 1  # only the first, addressed to localhost
    assert gateway.dataset_rows("support")[0]["label_source"] is None


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:18082", "LOCALHOST:1", "127.0.0.1:8080", "127.9.8.7", "[::1]:18082", "[::1]"],
)
async def test_loopback_hosts_are_answered_without_keys(gateway, host):
    r = await gateway.client.post("/v1/chat/completions", json=support_chat(), headers={"host": host})
    assert r.status_code == 200, r.text
    assert (await gateway.client.get("/status", headers={"host": host})).status_code == 200


async def test_a_foreign_origin_with_a_loopback_host_still_may_not_change_anything(gateway):
    served = await gateway.post(support_chat())
    label = {"request_id": served.headers["x-rswitch-request-id"], "score": 1}
    for origin in ("http://evil.example:18082", "http://localhost.evil.example"):
        r = await gateway.client.post("/v1/feedback", json=label, headers={"origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert gateway.dataset_rows("support")[0]["label_source"] is None
    own = await gateway.client.post("/v1/feedback", json=label, headers={"origin": "http://localhost"})
    assert own.status_code == 202


async def _app_client(tmp_path, override, bind_host):
    import httpx

    from rswitch.core import Core
    from rswitch.server import create_app

    core = Core(make_config(tmp_path, override))
    await core.start()
    app = create_app(core, manage_lifecycle=False, bind_host=bind_host)
    return core, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://evil.example")


@pytest.mark.parametrize(
    ("bind_host", "override", "status"),
    [
        ("127.0.0.1", {}, 403),  # key-free on loopback: checked
        ("localhost", {"gateway": {"auth": {"admin_key_hash": hash_key(ADMIN_KEY)}}}, 403),  # chat still open
        ("0.0.0.0", {}, 200),  # --insecure-no-auth beyond loopback: anyone may call, by choice
        ("192.0.2.1", {}, 200),
        ("127.0.0.1", {"gateway": {"auth": {"keys": [{"name": "app", "hash": hash_key(APP_KEY)}]}}}, 200),
    ],
    ids=["loopback", "admin-key-only", "insecure-any", "insecure-address", "client-keys"],
)
async def test_the_host_check_follows_the_bind_and_the_keys(tmp_path, bind_host, override, status):
    core, client = await _app_client(tmp_path, override, bind_host)
    try:
        r = await client.post("/v1/chat/completions", json=support_chat(), headers=bearer(APP_KEY))
        assert r.status_code == status, r.text
    finally:
        await client.aclose()
        await core.stop()


async def test_the_bound_name_is_answered(tmp_path):
    core, client = await _app_client(tmp_path, {}, "ip6-localhost")
    try:
        r = await client.get("/v1/models", headers={"host": "ip6-localhost:9000"})
        assert r.status_code == 200
    finally:
        await client.aclose()
        await core.stop()


@pytest.mark.slow
def test_rswitch_serve_refuses_a_rebound_host(tmp_path):
    import httpx

    from tests.test_real_server import rswitch_serve

    config = {
        "model_providers": {"mock": {"type": "mock"}},
        "templates": {"support": {"template": "You support {product}. Be {tone}."}},
        "gateway": {
            "combinations": [{"id": "sup", "template_id": "support", "model": "small", "provider": "mock"}]
        },
    }
    with rswitch_serve(config, tmp_path) as (url, _):
        port = url.rsplit(":", 1)[1]
        evil = {"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"}
        r = httpx.post(url + "/v1/chat/completions", json=support_chat(), headers=evil)
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(url + "/status", headers=evil).status_code == 403
        assert httpx.get(url + "/status").status_code == 200  # http://127.0.0.1:port
        assert httpx.get(url.replace("127.0.0.1", "localhost") + "/status").status_code == 200


# -- a key's tpm estimate is given back when nothing (or only part) was answered -----------------


def tpm_config(base_url: str) -> dict:
    return {
        "model_providers": {"up": {"type": "openai", "base_url": base_url, "api_key": "sk-x"}},
        "gateway": {
            "max_attempts": 1,
            "combinations": [{"id": "o", "template_id": "summarise", "model": "gpt-4o", "provider": "up"}],
            "auth": {"keys": [{"name": "app", "hash": hash_key(APP_KEY), "tpm": 1000}]},
        },
    }


def summary(**extra):
    # 900 asked tokens: an unsettled estimate leaves the key's 1000 tpm too little for the next
    return {"messages": [{"role": "user", "content": "hi"}], "model": "o", "variables": {"words": 3}, **extra}


async def test_a_broken_stream_gives_the_keys_tpm_estimate_back(make_gateway):
    from tests.fakes import openai_fake
    from tests.fakes.server import Fault

    with openai_fake.running() as fake:
        gw = await make_gateway(tpm_config(fake.base_url))
        for _ in range(3):
            fake.faults.push(Fault("cut", after=1))
            broken = await gw.post(summary(stream=True, max_tokens=900), headers=bearer(APP_KEY))
            assert broken.status_code == 200 and '"error"' in broken.text and "[DONE]" not in broken.text
            after = await gw.post(summary(max_tokens=900), headers=bearer(APP_KEY))
            assert after.status_code == 200, after.text  # was 429: the broken stream kept 900 tokens


async def test_a_cancelled_call_gives_the_keys_tpm_estimate_back(make_gateway):
    import asyncio

    from tests.fakes import openai_fake
    from tests.fakes.server import Fault

    with openai_fake.running() as fake:
        gw = await make_gateway(tpm_config(fake.base_url))
        for n in range(1, 4):
            fake.faults.push(Fault("stall", seconds=60))
            call = asyncio.create_task(gw.post(summary(max_tokens=900), headers=bearer(APP_KEY)))
            for _ in range(500):  # until the upstream holds the call
                if len(fake.recorder.requests) == 2 * n - 1:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the upstream never received the call to cancel")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            after = await gw.post(summary(max_tokens=900), headers=bearer(APP_KEY))
            assert after.status_code == 200, after.text


@pytest.mark.slow
def test_a_client_leaving_a_stream_gives_the_keys_tpm_estimate_back(tmp_path):
    """On a real server: the client reads the first piece and hangs up."""
    import httpx

    from rswitch.core import Core
    from rswitch.tui.server import GatewayThread

    mock = {"type": "mock", "mock": {"stream_chunks": 20, "chunk_delay_ms": 200, "response": "word " * 40}}
    cfg = make_config(
        tmp_path,
        {
            "model_providers": {"mock": mock},
            "gateway": {"auth": {"keys": [{"name": "app", "hash": hash_key(APP_KEY), "tpm": 1000}]}},
        },
    )
    core = Core(cfg)
    server = GatewayThread(core, "127.0.0.1", 0)
    url = server.start()
    try:
        body = {**support_chat(), "max_tokens": 900}
        with httpx.Client(base_url=url, headers=bearer(APP_KEY), timeout=30) as client:
            for n in range(1, 3):
                with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    assert "content" in next(r.iter_text())  # then the client hangs up
                left = []
                for _ in range(500):  # until the gateway has recorded the stream its client left
                    left = server.call(lambda: [c for c in core.gateway.recent if c.status == 499])
                    if len(left) == n:
                        break
                    threading.Event().wait(0.01)
                assert len(left) == n
                after = client.post("/v1/chat/completions", json=body)
                assert after.status_code == 200, after.text
    finally:
        server.stop()


# -- template-limited keys: embeddings, stats and optimizer views ------------------------------


def limited_config() -> dict:
    return {
        "gateway": {
            "auth": {
                "keys": [
                    {"name": "app", "hash": hash_key(APP_KEY)},
                    {"name": "summariser", "hash": hash_key(SUM_KEY), "templates": ["summarise"]},
                ],
                "admin_key_hash": hash_key(ADMIN_KEY),
            }
        }
    }


async def test_a_key_limited_to_templates_embeds_only_through_their_combinations(make_gateway):
    gw = await make_gateway(limited_config())

    async def embed(key: str, **body):
        return await gw.client.post("/v1/embeddings", json={"input": "hello", **body}, headers=bearer(key))

    assert (await embed(SUM_KEY, model="sum-a")).status_code == 200
    assert (await embed(SUM_KEY, model="x", metadata={"combination_id": "sum-a"})).status_code == 200
    other = await embed(SUM_KEY, model="support-a")
    assert other.status_code == 403
    err = other.json()["error"]
    assert err["code"] == "template_not_allowed" and err["type"] == "permission_error"
    assert "'support-a' is a combination of template 'support'" in err["message"]
    assert "may call only template(s) summarise" in err["message"]
    by_model = await embed(SUM_KEY, model="small")  # a model name: not a combination of its templates
    assert by_model.status_code == 403
    assert "'mock/small' is not a combination of them" in by_model.json()["error"]["message"]
    named = await embed(SUM_KEY, model="small", metadata={"combination_id": "support-b"})
    assert named.status_code == 403
    assert (await embed(APP_KEY, model="small")).status_code == 200  # an unlimited key embeds anything
    rows = [r for r in gw.analytics_rows() if r["kind"] == "embedding"]
    assert [(r["combination_id"], r["client"]) for r in rows] == [
        ("sum-a", "summariser"),
        ("sum-a", "summariser"),
        ("mock/small", "app"),
    ]


async def test_a_key_limited_to_templates_reads_only_their_stats_runs_and_trials(make_gateway):
    gw = await make_gateway(limited_config())
    assert (await gw.post(support_chat(), headers=bearer(APP_KEY))).status_code == 200
    gw.flush()
    secret = "You are Acme's secret support playbook"  # another tenant's optimized prompt
    for run_id, tid, instruction in (("rs", "support", secret), ("rm", "summarise", "Summarise tersely")):
        gw.core.analytics.record_run(
            {"run_id": run_id, "template_id": tid, "winner_instruction": instruction}
        )
        for trial in range(2):
            row = {
                "template_id": tid,
                "trial": trial,
                "instruction": 0,
                "demo_set": 0,
                "minibatch_score": 0.5,
            }
            gw.core.analytics.record_trial(run_id, row)

    async def get(key: str, path: str):
        return await gw.client.get(path, headers=bearer(key))

    answers = []
    for path in ("/v1/prompts/support/stats", "/v1/prompts/support-a/stats"):
        r = await get(SUM_KEY, path)
        answers.append(r)
        assert r.status_code == 403, path
        assert r.json()["error"]["code"] == "template_not_allowed"
        assert "may read only template(s) summarise, not template 'support'" in r.json()["error"]["message"]
    assert "'support-a' is one of its combinations" in answers[-1].json()["error"]["message"]
    for path in ("/v1/prompts/summarise/stats", "/v1/prompts/sum-a/stats"):
        assert (await get(SUM_KEY, path)).status_code == 200, path

    runs = await get(SUM_KEY, "/v1/optimizer/runs")
    assert [r["run_id"] for r in runs.json()["runs"]] == ["rm"]
    assert runs.json()["optimizer"] == {"enabled": False}
    own = await get(SUM_KEY, "/v1/optimizer/runs?template_id=summarise")
    assert [r["run_id"] for r in own.json()["runs"]] == ["rm"]
    for path in ("/v1/optimizer/runs?template_id=support", "/v1/optimizer/trials?template_id=support"):
        r = await get(SUM_KEY, path)
        answers.append(r)
        assert r.status_code == 403 and r.json()["error"]["code"] == "template_not_allowed", path
    other_trials = await get(SUM_KEY, "/v1/optimizer/trials?run_id=rs")
    assert other_trials.status_code == 200 and other_trials.json()["trials"] == []
    own_trials = await get(SUM_KEY, "/v1/optimizer/trials?run_id=rm")
    assert [t["trial"] for t in own_trials.json()["trials"]] == [0, 1]
    answers += [runs, other_trials]
    assert not any(secret in r.text for r in answers)

    # an unlimited key and the admin key still read every template
    for key in (APP_KEY, ADMIN_KEY):
        assert (await get(key, "/v1/prompts/support/stats")).status_code == 200
        assert {r["run_id"] for r in (await get(key, "/v1/optimizer/runs")).json()["runs"]} == {"rs", "rm"}
        assert len((await get(key, "/v1/optimizer/trials?run_id=rs")).json()["trials"]) == 2
