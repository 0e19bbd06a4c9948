"""The admin API on the in-process app: the console's views and every operator action, as a
client of /admin/v1 sees them; each answer validated against the model the OpenAPI names."""

from __future__ import annotations

import asyncio
import io
import tarfile
from typing import Any

import httpx
import orjson
import pytest

from rswitch.admin import actions, views
from rswitch.admin.api import ENDPOINTS, PREFIX
from rswitch.auth import hash_key, new_key
from rswitch.core import Core
from rswitch.server import create_app
from tests.conftest import SUPPORT_VARS, chat, make_config
from tests.test_mipro import rows
from tests.test_optimizer_background import wire_one_model
from tests.test_optimizer_service import CONFIG as OPT_CONFIG

SUPPORT = chat(metadata={"template_id": "support"}, variables=SUPPORT_VARS)


async def served_by(gw: Any, n: int = 8) -> set[str]:
    out = set()
    for _ in range(n):
        r = await gw.post(SUPPORT)
        assert r.status_code == 200, r.text
        out.add(r.headers["x-rswitch-combination"])
    return out


async def test_snapshot_is_the_typed_console_view_with_new_events_only(gateway):
    r = await gateway.post(SUPPORT)
    rid = r.headers["x-rswitch-request-id"]
    snap = views.ConsoleSnapshot.model_validate((await gateway.client.get(PREFIX + "/snapshot")).json())
    assert [c.id for c in snap.combinations] == ["support-a", "support-b", "sum-a"]
    assert snap.traffic.requests == 1
    assert [a.request_id for a in snap.recent] == [rid]
    await gateway.client.post(PREFIX + "/combinations/sum-a/disable")
    events = (await gateway.client.get(PREFIX + "/snapshot")).json()["events"]
    assert [e["text"] for e in events] == ["sum-a disabled"]
    newer = (
        await gateway.client.get(PREFIX + "/snapshot", params={"events_after": events[-1]["seq"]})
    ).json()
    assert newer["events"] == []
    bad = await gateway.client.get(PREFIX + "/snapshot", params={"events_after": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "events_after"


async def test_status_route_and_slash_status_serve_the_same_view(gateway):
    await gateway.post(SUPPORT)
    gateway.flush()  # the call in DuckDB before either view reads it, not between the two
    old = (await gateway.client.get("/status")).json()
    new = (await gateway.client.get(PREFIX + "/status")).json()
    views.Status.model_validate(old)
    assert old.keys() == new.keys()
    assert old["combinations"][0]["analytics"].keys() == new["combinations"][0]["analytics"].keys()
    assert "analytics_error" not in old  # an optional part that does not apply is left out, as before


async def test_recent_call_detail_and_unknown_ids(gateway):
    r = await gateway.post(SUPPORT)
    rid = r.headers["x-rswitch-request-id"]
    call = views.RecentCall.model_validate((await gateway.client.get(f"{PREFIX}/calls/{rid}")).json())
    assert call.system_prompt == "You support Acme. Be kind." and call.messages[-1]["content"] == "hello"
    missing = await gateway.client.get(f"{PREFIX}/calls/{rid}", params={"attempt": 2})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"
    assert (await gateway.client.get(f"{PREFIX}/calls/nope")).status_code == 404


async def test_recent_call_detail_names_the_attempts_before_a_fallback(make_gateway):
    gw = await make_gateway(
        {
            "model_providers": {
                "broken": {
                    "type": "mock",
                    "retry_same": 0,
                    "mock": {"failure_rate": 1.0, "failure_status": 500},
                }
            },
            "gateway": {
                "combinations": [
                    {
                        "id": "support-a",
                        "template_id": "support",
                        "model": "small",
                        "provider": "broken",
                        "fallbacks": ["support-b"],
                    },
                    {"id": "support-b", "template_id": "support", "model": "large", "provider": "mock"},
                ]
            },
        }
    )
    r = await gw.post(chat(metadata={"combination_id": "support-a"}, variables=SUPPORT_VARS))
    assert r.status_code == 200 and r.headers["x-rswitch-combination"] == "support-b", r.text
    served = (await gw.client.get(f"{PREFIX}/calls/{r.headers['x-rswitch-request-id']}")).json()
    chain = views.RecentCall.model_validate(served).attempts
    assert [(a["combination"], a["status"]) for a in chain or []] == [("support-a", 500), ("support-b", 200)]
    assert chain[0]["error_type"] == "upstream_error" and chain[1]["error_type"] is None


async def test_reweight_and_routing_follows(gateway):
    assert await served_by(gateway) == {"support-a", "support-b"}
    r = await gateway.client.post(PREFIX + "/combinations/support-a/weight", json={"weight": 0})
    assert r.status_code == 200
    assert views.CombinationView.model_validate(r.json()).weight == 0
    assert await served_by(gateway) == {"support-b"}


async def test_reweight_refuses_bad_input_and_changes_nothing(gateway):
    for body, param in (({"weight": -1}, "weight"), ({"weight": "2"}, "weight"), ({}, "weight")):
        r = await gateway.client.post(PREFIX + "/combinations/support-a/weight", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = await gateway.client.post(PREFIX + "/combinations/nope/weight", json={"weight": 1})
    assert r.status_code == 404 and "support-a" in r.json()["error"]["message"]
    form = await gateway.client.post(
        PREFIX + "/combinations/support-a/weight", content=b"weight=0", headers={"content-type": "text/plain"}
    )
    assert form.status_code == 415
    assert gateway.core.gateway.combinations["support-a"].weight == 3


async def test_disable_enable_and_reset(gateway):
    assert (await gateway.client.post(PREFIX + "/combinations/support-b/disable")).json()["enabled"] is False
    assert await served_by(gateway) == {"support-a"}
    await gateway.client.post(PREFIX + "/combinations/support-a/weight", json={"weight": 0})
    await gateway.client.post(PREFIX + "/combinations/support-b/enable")
    assert await served_by(gateway) == {"support-b"}
    reset = actions.CombinationsChanged.model_validate(
        (await gateway.client.post(PREFIX + "/combinations/reset")).json()
    )
    assert {c.id: (c.weight, c.enabled) for c in reset.combinations}["support-a"] == (3, True)
    assert await served_by(gateway) == {"support-a", "support-b"}


async def test_mutations_refuse_a_foreign_origin(gateway):
    r = await gateway.client.post(
        PREFIX + "/combinations/support-a/disable", headers={"origin": "https://evil.example"}
    )
    assert r.status_code == 403
    assert gateway.core.gateway.combinations["support-a"].enabled


ADMIN = new_key()
CLIENT = new_key()


async def test_keys_guard_every_admin_route(make_gateway):
    gw = await make_gateway(
        {
            "gateway": {
                "auth": {
                    "keys": [{"name": "app", "hash": hash_key(CLIENT)}],
                    "admin_key_hash": hash_key(ADMIN),
                }
            }
        }
    )
    for e in ENDPOINTS:
        path = PREFIX + e.path.format(
            combination_id="support-a", template_id="support", request_id="x", run_id="r1"
        )
        none = await gw.client.request(e.method, path)
        client = await gw.client.request(e.method, path, headers={"authorization": f"Bearer {CLIENT}"})
        wrong = await gw.client.request(e.method, path, headers={"authorization": "Bearer sk-wrong-key-123"})
        assert (none.status_code, client.status_code, wrong.status_code) == (401, 403, 403), path
    ok = await gw.client.get(PREFIX + "/snapshot", headers={"authorization": f"Bearer {ADMIN}"})
    assert ok.status_code == 200
    assert gw.core.gateway.combinations["support-a"].enabled


async def test_template_register_is_served_and_rollback_restores(gateway):
    r = await gateway.client.post(
        PREFIX + "/templates", json={"template_id": "support", "template": "You help with {product} only."}
    )
    assert r.status_code == 201, r.text
    assert actions.TemplateVersion.model_validate(r.json()).version == 2
    texts = [e["text"] for e in (await gateway.client.get(PREFIX + "/snapshot")).json()["events"]]
    assert texts.count("template 'support' version 2 is served now") == 1
    answer = await gateway.post(chat(metadata={"template_id": "support"}, variables={"product": "Acme"}))
    call = (await gateway.client.get(f"{PREFIX}/calls/{answer.headers['x-rswitch-request-id']}")).json()
    assert call["system_prompt"] == "You help with Acme only."
    history = actions.TemplateHistory.model_validate(
        (await gateway.client.get(PREFIX + "/templates/support/history")).json()
    )
    assert [v.version for v in history.versions] == [1, 2] and history.current == 2
    back = await gateway.client.post(PREFIX + "/templates/support/rollback", json={"version": 1})
    assert back.json()["version"] == 3 and back.json()["provenance"]["rollback_of"] == 1
    answer = await gateway.post(SUPPORT)
    call = (await gateway.client.get(f"{PREFIX}/calls/{answer.headers['x-rswitch-request-id']}")).json()
    assert call["system_prompt"] == "You support Acme. Be kind."
    bad = await gateway.client.post(PREFIX + "/templates/support/rollback", json={"version": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "version"


async def test_template_register_refuses_bad_input(gateway):
    cases = [
        ({"template_id": "bad id", "template": "x"}, "template_id"),
        ({"template_id": "t", "template": "   "}, "template"),
        ({"template_id": "t", "template": "{a}", "variables": ["b"]}, "template"),
        ({"template_id": "t", "template": "x", "default_provider": "nowhere"}, "default_provider"),
        ({"template": "x"}, "template_id"),
    ]
    for body, param in cases:
        r = await gateway.client.post(PREFIX + "/templates", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert gateway.core.registry.get("t") is None


async def test_dataset_import_export_round_trip(gateway):
    lines = [
        {"input": "where is my order", "expected": "Let me check.", "variables": SUPPORT_VARS},
        {"messages": [{"role": "user", "content": "refund?"}], "score": 0.5},
    ]
    body = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    r = await gateway.client.post(
        PREFIX + "/datasets/support/import", content=body, headers={"content-type": "application/x-ndjson"}
    )
    assert actions.DatasetImported.model_validate(r.json()).imported == 2 and r.json()["labelled"] == 2
    await gateway.post(SUPPORT)  # an unlabelled one from traffic
    out = await gateway.client.get(PREFIX + "/datasets/support/export", params={"labelled": "true"})
    assert out.headers["content-type"].startswith("application/x-ndjson")
    got = [orjson.loads(line) for line in out.content.splitlines()]
    assert [g["messages"][-1]["content"] for g in got] == ["where is my order", "refund?"]
    assert [g["label_expected"] for g in got] == ["Let me check.", None] and got[1]["label_score"] == 0.5
    everything = await gateway.client.get(PREFIX + "/datasets/support/export")
    assert len(everything.content.splitlines()) == 3
    # what was exported imports again, into another template
    back = await gateway.client.post(
        PREFIX + "/datasets/summarise/import",
        content=b"".join(
            orjson.dumps({"messages": g["messages"], "expected": g["label_expected"] or "x"}) + b"\n"
            for g in got
        ),
        headers={"content-type": "application/x-ndjson"},
    )
    assert back.json()["imported"] == 2


async def test_dataset_import_names_every_bad_line_and_imports_nothing(gateway):
    body = b'{"input": "fine"}\nnot json\n{"input": "x", "score": 7}\n'
    r = await gateway.client.post(
        PREFIX + "/datasets/support/import", content=body, headers={"content-type": "application/x-ndjson"}
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "line 2: not valid JSON" in message and "line 3: 'score'" in message
    assert gateway.core.datasets.recent("support") == []
    unknown = await gateway.client.post(
        PREFIX + "/datasets/nope/import",
        content=b'{"input": "x"}\n',
        headers={"content-type": "application/x-ndjson"},
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "template_id"
    plain = await gateway.client.post(
        PREFIX + "/datasets/support/import",
        content=b'{"input": "x"}\n',
        headers={"content-type": "text/plain"},
    )
    assert plain.status_code == 415


async def test_package_export_download_imports_into_a_second_gateway(make_gateway, tmp_path):
    first = await make_gateway()
    await first.client.post(
        PREFIX + "/templates",
        json={
            "template_id": "faq",
            "template": "Answer FAQs about {product}.",
            "default_model": "small",
            "default_provider": "mock",
        },
    )
    served = await first.post(chat(metadata={"template_id": "faq"}, variables={"product": "Acme"}))
    assert served.status_code == 200, served.text
    r = await first.client.post(PREFIX + "/packages/export", json={"template_id": "faq"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert "faq-" in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        assert any(n.endswith("package.yaml") for n in tar.getnames())

    second_dir = tmp_path / "second"
    second_dir.mkdir()
    core = Core(make_config(second_dir))
    await core.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(core, manage_lifecycle=False)),
            base_url="http://127.0.0.1",
        ) as other:
            done = await other.post(
                PREFIX + "/packages/import", content=r.content, headers={"content-type": "application/gzip"}
            )
            assert done.status_code == 200, done.text
            imported = actions.PackageImported.model_validate(done.json())
            assert imported.template_id == "faq" and imported.dataset_rows == 1
            assert core.registry.get("faq") is not None  # served at once
            again = await other.post(
                PREFIX + "/packages/import", content=r.content, headers={"content-type": "application/gzip"}
            )
            assert again.status_code == 409
            junk = await other.post(
                PREFIX + "/packages/import",
                content=b"not a tarball",
                headers={"content-type": "application/gzip"},
            )
            assert junk.status_code == 400
    finally:
        await core.stop()


async def test_export_of_an_unknown_template_is_404(gateway):
    r = await gateway.client.post(PREFIX + "/packages/export", json={"template_id": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "template_id"
    r = await gateway.client.post(
        PREFIX + "/packages/export", json={"template_id": "support", "logs_limit": -1}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "logs_limit"


OPTIMIZING = {
    **OPT_CONFIG,
    "gateway": {
        **OPT_CONFIG["gateway"],
        "optimization": {
            "enabled": True,
            "interval_seconds": 3600,
            "min_new_labels": 10,
            "evaluator": "exact_match",
            "auto": "heavy",
        },
    },
}


async def until(check: Any, timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def test_optimize_now_then_cancel(make_gateway):
    gw = await make_gateway(OPTIMIZING)
    wire_one_model(gw.core, delay=0.02)
    examples = b"".join(
        orjson.dumps({"messages": e.messages, "variables": e.variables, "expected": e.expected}) + b"\n"
        for e in rows(60)
    )
    r = await gw.client.post(
        PREFIX + "/datasets/echo/import", content=examples, headers={"content-type": "application/x-ndjson"}
    )
    assert r.json()["imported"] == 60
    nothing = await gw.client.post(PREFIX + "/optimizer/cancel")
    assert nothing.status_code == 409
    queued = await gw.client.post(PREFIX + "/optimizer/runs", json={"template_id": "echo"})
    assert queued.status_code == 202 and queued.json() == {"status": "queued", "template_id": "echo"}

    async def running() -> bool:
        snap = (await gw.client.get(PREFIX + "/snapshot")).json()
        return snap["optimizer"]["running"] == "echo"

    await until(running)
    cancelled = await gw.client.post(PREFIX + "/optimizer/cancel")
    assert cancelled.json() == {"status": "cancelling", "template_id": "echo"}

    async def recorded() -> Any:
        runs = (await gw.client.get(PREFIX + "/optimizer/runs", params={"template_id": "echo"})).json()
        return runs if runs["runs"] else None

    runs = actions.OptimizerRuns.model_validate(await until(recorded))
    assert runs.runs[0].verdict == "stopped: cancelled; nothing promoted"
    trials = await gw.client.get(PREFIX + "/optimizer/trials", params={"run_id": runs.runs[0].run_id})
    actions.OptimizerTrials.model_validate(trials.json())
    assert gw.core.registry.get("echo").version == 1
    unknown = await gw.client.post(PREFIX + "/optimizer/runs", json={"template_id": "nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "template_id"


async def test_optimize_with_the_optimizer_off_is_409(gateway):
    r = await gateway.client.post(PREFIX + "/optimizer/runs", json={"template_id": "support"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "optimizer_disabled"
    assert (await gateway.client.get(PREFIX + "/optimizer/trials")).status_code == 400


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
async def test_every_route_is_in_the_openapi_description(gateway, endpoint):
    spec = (await gateway.client.get(PREFIX + "/openapi.json")).json()
    op = spec["paths"][PREFIX + endpoint.path][endpoint.method.lower()]
    answer = op["responses"][str(endpoint.status)]["content"]
    if endpoint.response is not None:
        name = answer["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert name == endpoint.response.__name__ and name in spec["components"]["schemas"]
    routes = {(r.path, m) for r in gateway_routes(gateway) for m in (r.methods or ())}
    assert (PREFIX + endpoint.path, endpoint.method) in routes


def gateway_routes(gw: Any) -> list[Any]:
    return [r for r in gw.client._transport.app.routes if r.path.startswith(PREFIX)]


async def test_openapi_lists_exactly_the_admin_routes(gateway):
    spec = (await gateway.client.get(PREFIX + "/openapi.json")).json()
    described = {(p, m.upper()) for p, ops in spec["paths"].items() for m in ops}
    served = {(r.path, m) for r in gateway_routes(gateway) for m in (r.methods or ()) if m != "HEAD"}
    assert described == served


async def test_every_json_answer_validates_against_the_model_its_description_names(gateway):
    """One call of each route (a refusal too), each answer read with the model the OpenAPI
    description names for it."""
    from rswitch.admin.api import ErrorBody

    rid = (await gateway.post(SUPPORT)).headers["x-rswitch-request-id"]
    ndjson = {"content-type": "application/x-ndjson"}
    calls = {
        "snapshot": ("GET", "/snapshot", {}),
        "status": ("GET", "/status", {}),
        "recent_call": ("GET", f"/calls/{rid}", {}),
        "inflight_call": ("GET", f"/inflight/{rid}", {}),  # refused: it has ended
        "optimizer_runs": ("GET", "/optimizer/runs", {}),
        "optimizer_trials": ("GET", "/optimizer/trials", {"params": {"template_id": "support"}}),
        "reweight": ("POST", "/combinations/support-b/weight", {"json": {"weight": 2}}),
        "enable": ("POST", "/combinations/support-b/enable", {}),
        "disable": ("POST", "/combinations/sum-a/disable", {}),
        "reset_weights": ("POST", "/combinations/reset", {}),
        "dataset_import": (
            "POST",
            "/datasets/support/import",
            {"content": b'{"input": "q"}\n', "headers": ndjson},
        ),
        "template_register": ("POST", "/templates", {"json": {"template_id": "new", "template": "Hi {x}."}}),
        "template_history": ("GET", "/templates/new/history", {}),
        "template_rollback": ("POST", "/templates/support/rollback", {"json": {"version": 1}}),  # refused
        "optimize": (
            "POST",
            "/optimizer/runs",
            {"json": {"template_id": "support"}},
        ),  # refused: optimizer off
        "cancel_optimize": ("POST", "/optimizer/cancel", {}),  # refused: nothing running
        "compare": (
            "POST",
            "/templates/support/compare",
            {"json": {"candidates": ["support-b"], "dry_run": True}},
        ),
        "compare_runs": ("GET", "/templates/support/compare/runs", {}),
        "apply_compare": ("POST", "/templates/support/compare/runs/nope/apply", {}),  # refused: unknown run
        "import_package": (
            "POST",
            "/packages/import",
            {"content": b"x", "headers": {"content-type": "text/plain"}},
        ),
    }
    checked = set()
    for e in ENDPOINTS:
        if e.response is None or e.name not in calls:
            continue
        method, path, kw = calls[e.name]
        r = await gateway.client.request(method, PREFIX + path, **kw)
        model = e.response if r.status_code == e.status else ErrorBody
        model.model_validate(r.json())
        checked.add(e.name)
    with_models = {e.name for e in ENDPOINTS if e.response is not None}
    assert checked == with_models


async def test_event_stream_heartbeats_delivers_an_action_and_ends_on_close(gateway):
    admin = gateway.client._transport.app.state.admin
    admin.heartbeat = 0  # every idle poll says it is alive
    stream = admin._event_stream(gateway.core.gateway.event_seq)
    assert (await anext(stream)).startswith(b":")
    assert await anext(stream) == b": heartbeat\n\n"
    await gateway.client.post(PREFIX + "/combinations/sum-a/disable")
    message = await anext(stream)
    data = orjson.loads(message.split(b"data: ", 1)[1])
    assert views.Event.model_validate(data).text == "sum-a disabled"
    assert message.startswith(b"id: %d\nevent: event\n" % data["seq"])
    assert admin.open_streams == 1
    admin.close()
    rest = [chunk async for chunk in stream]
    assert rest[-1] == b"event: shutdown\ndata: {}\n\n"
    assert admin.open_streams == 0


async def test_uploads_over_the_limit_are_413_whether_declared_or_streamed(gateway):
    admin = gateway.client._transport.app.state.admin
    admin.upload_limit = 1000
    gz = {"content-type": "application/gzip"}
    declared = await gateway.client.post(PREFIX + "/packages/import", content=b"x" * 1001, headers=gz)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

    async def chunks():
        for _ in range(20):
            yield b"y" * 100

    streamed = await gateway.client.post(
        PREFIX + "/datasets/support/import",
        content=chunks(),
        headers={"content-type": "application/x-ndjson"},
    )
    assert streamed.status_code == 413
    assert gateway.core.datasets.recent("support") == []


async def test_a_request_in_flight_then_among_the_recent_calls(gateway):
    from tests.test_optimizer_service import reply

    gate = asyncio.Event()

    async def held(call: Any) -> dict[str, Any]:
        await gate.wait()
        return reply("done")

    gateway.core.providers["mock"].complete = held
    task = asyncio.create_task(gateway.post(SUPPORT))

    async def flying() -> Any:
        snap = (await gateway.client.get(PREFIX + "/snapshot")).json()
        return snap["inflight"]["calls"]

    (flight,) = await until(flying)
    rid = flight["request_id"]
    detail = views.InFlightDetail.model_validate(
        (await gateway.client.get(f"{PREFIX}/inflight/{rid}")).json()
    )
    assert detail.stage == "calling" and detail.system_prompt == "You support Acme. Be kind."
    assert (await gateway.client.get(f"{PREFIX}/calls/{rid}")).status_code == 404
    gate.set()
    assert (await task).status_code == 200
    ended = await gateway.client.get(f"{PREFIX}/inflight/{rid}")
    assert ended.status_code == 404 and ended.json()["error"]["param"] == "request_id"
    assert (await gateway.client.get(f"{PREFIX}/calls/{rid}")).json()["output"] == "done"
