"""Who may call: client keys, the admin key, and what a web page in the operator's browser can
do, through real requests to the ASGI app."""

from __future__ import annotations

import logging
from typing import Any

import duckdb
import pytest

from rswitch.auth import hash_key, is_loopback, new_key
from rswitch.config import ConfigError
from rswitch.storage.analytics import AnalyticsStore
from rswitch.storage.record import CallRecord
from tests.conftest import SUPPORT_VARS, chat

APP_KEY = new_key()
SUM_KEY = new_key()
ADMIN_KEY = new_key()


def auth_config(**auth: Any) -> dict[str, Any]:
    return {
        "gateway": {
            "auth": {
                "keys": [
                    {"name": "app", "hash": hash_key(APP_KEY)},
                    {"name": "summariser", "hash": hash_key(SUM_KEY), "templates": ["summarise"]},
                ],
                "admin_key_hash": hash_key(ADMIN_KEY),
                **auth,
            }
        }
    }


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def support(**extra: Any) -> dict[str, Any]:
    return chat(variables=SUPPORT_VARS, metadata={"template_id": "support"}, **extra)


async def test_without_keys_the_quick_start_is_unchanged(make_gateway):
    gw = await make_gateway()
    r = await gw.post(support())
    assert r.status_code == 200
    assert (await gw.client.get("/status")).status_code == 200
    fb = await gw.client.post(
        "/v1/feedback", json={"request_id": r.headers["x-rswitch-request-id"], "score": 1}
    )
    assert fb.status_code == 202
    assert gw.analytics_rows()[0]["client"] is None


async def test_client_endpoints_need_a_valid_key_and_record_its_name(make_gateway):
    gw = await make_gateway(auth_config())
    missing = await gw.post(support())
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong_key = "rsk-" + "x" * 43
    wrong = await gw.post(support(), headers=bearer(wrong_key))
    assert wrong.status_code == 403
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert wrong_key not in wrong.text
    assert (await gw.client.get("/v1/models")).status_code == 401
    assert gw.analytics_rows() == []  # refused calls reach no upstream and record nothing

    ok = await gw.post(support(), headers=bearer(APP_KEY))
    assert ok.status_code == 200
    streamed = await gw.post(support(stream=True), headers=bearer(APP_KEY))
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    assert (await gw.client.get("/v1/models", headers=bearer(APP_KEY))).status_code == 200
    assert [row["client"] for row in gw.analytics_rows()] == ["app", "app"]


async def test_admin_key_is_needed_for_mutations_and_the_operator_views(make_gateway):
    gw = await make_gateway(auth_config())
    served = await gw.post(support(), headers=bearer(APP_KEY))
    label = {"request_id": served.headers["x-rswitch-request-id"], "score": 0.5}
    gw.flush()
    for method, path, body in (
        ("POST", "/v1/feedback", label),
        ("POST", "/v1/optimizer/runs", {"template_id": "support"}),
        ("GET", "/status", None),
        ("GET", "/metrics", None),
        ("GET", "/health/storage", None),
    ):
        nokey = await gw.client.request(method, path, json=body)
        assert nokey.status_code == 401, path
        client = await gw.client.request(method, path, json=body, headers=bearer(APP_KEY))
        assert client.status_code == 403, path
        assert client.json()["error"]["code"] == "admin_only"
        admin = await gw.client.request(method, path, json=body, headers=bearer(ADMIN_KEY))
        # the optimizer is off in this config: the admin gets past the key check to its 409
        assert admin.status_code == {"/v1/feedback": 202, "/v1/optimizer/runs": 409}.get(path, 200), (
            admin.text
        )
    assert [r["label_source"] for r in gw.dataset_rows("support")] == ["feedback"]
    assert (await gw.client.get("/health")).status_code == 200  # liveness stays open


async def test_admin_key_also_serves_the_app_endpoints_recorded_as_admin(make_gateway):
    gw = await make_gateway(auth_config())
    assert (await gw.post(support(), headers=bearer(ADMIN_KEY))).status_code == 200
    assert gw.analytics_rows()[0]["client"] == "admin"


async def test_client_keys_without_an_admin_key_close_the_operator_endpoints(make_gateway):
    gw = await make_gateway({"gateway": {"auth": {"keys": [{"name": "app", "hash": hash_key(APP_KEY)}]}}})
    r = await gw.client.get("/status", headers=bearer(APP_KEY))
    assert r.status_code == 403
    assert "no admin key is configured" in r.json()["error"]["message"]


async def test_only_an_admin_key_leaves_app_endpoints_open_to_any_sdk_key(make_gateway):
    gw = await make_gateway({"gateway": {"auth": {"admin_key_hash": hash_key(ADMIN_KEY)}}})
    assert (await gw.post(support(), headers=bearer("sk-whatever-the-sdk-sends"))).status_code == 200
    assert (await gw.client.get("/status")).status_code == 401


async def test_a_key_limited_to_templates_gets_403_for_another(make_gateway):
    gw = await make_gateway(auth_config())
    other = await gw.post(support(), headers=bearer(SUM_KEY))
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "template_not_allowed"
    assert "'support'" in other.json()["error"]["message"]
    by_model = await gw.post(chat(model="support-a", variables=SUPPORT_VARS), headers=bearer(SUM_KEY))
    assert by_model.status_code == 403
    own = await gw.post(
        chat(variables={"words": 5}, metadata={"template_id": "summarise"}), headers=bearer(SUM_KEY)
    )
    assert own.status_code == 200
    # naming nothing would balance over every template: the key must name one of its own
    unnamed = await gw.post(chat(variables={"words": 5, **SUPPORT_VARS}), headers=bearer(SUM_KEY))
    assert unnamed.status_code == 403
    assert "name one with metadata.template_id" in unnamed.json()["error"]["message"]
    assert {row["template_id"] for row in gw.analytics_rows()} == {"summarise"}


async def test_per_key_rpm_limits_that_key_only(make_gateway):
    cfg = auth_config()
    cfg["gateway"]["auth"]["keys"][0]["rpm"] = 2
    gw = await make_gateway(cfg)
    codes = [(await gw.post(support(), headers=bearer(APP_KEY))).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    limited = await gw.post(support(), headers=bearer(APP_KEY))
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "'app'" in limited.json()["error"]["message"]
    assert int(limited.headers["retry-after"]) <= 60
    traffic = gw.core.status()["traffic"]  # the key's own quota: the client's, not a gateway failure
    assert (traffic["rejected"], traffic["failed"], traffic["succeeded"]) == (2, 0, 2)
    summary = chat(variables={"words": 5}, metadata={"template_id": "summarise"})
    assert (await gw.post(summary, headers=bearer(SUM_KEY))).status_code == 200


async def test_per_key_tpm_is_settled_with_real_usage_and_one_request_holds_at_most_a_window(make_gateway):
    cfg = auth_config()
    cfg["gateway"]["auth"]["keys"][0]["tpm"] = 1000
    gw = await make_gateway(cfg)
    # a huge max_tokens takes at most the key's whole window, and is settled like any other
    assert (await gw.post(support(max_tokens=10**9), headers=bearer(APP_KEY))).status_code == 200
    for _ in range(3):  # each settles to its small real usage, so the bucket is never left empty
        r = await gw.post(support(max_tokens=900), headers=bearer(APP_KEY))
        assert r.status_code == 200
    # a request the gateway refuses gives the key's estimate back
    ghost = chat(variables=SUPPORT_VARS, max_tokens=900, metadata={"combination_id": "ghost"})
    for _ in range(3):
        assert (await gw.post(ghost, headers=bearer(APP_KEY))).status_code == 400
        assert (await gw.post(support(max_tokens=900), headers=bearer(APP_KEY))).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ],
)
@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/embeddings", "/v1/feedback", "/v1/optimizer/runs"]
)
async def test_simple_request_content_types_are_refused_with_415(gateway, path, content_type):
    import orjson

    headers = {"content-type": content_type} if content_type else {}
    r = await gateway.client.post(path, content=orjson.dumps(support()), headers=headers)
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert gateway.analytics_rows() == []


async def test_json_with_a_charset_is_accepted(gateway):
    import orjson

    r = await gateway.client.post(
        "/v1/chat/completions",
        content=orjson.dumps(support()),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200


async def test_a_foreign_origin_may_not_change_anything(make_gateway):
    gw = await make_gateway({"gateway": {"cors": {"allow_origins": ["https://console.example"]}}})
    served = await gw.post(support())
    label = {"request_id": served.headers["x-rswitch-request-id"], "score": 1}
    evil = await gw.client.post("/v1/feedback", json=label, headers={"origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    queued = await gw.client.post(
        "/v1/optimizer/runs", json={"template_id": "support"}, headers={"origin": "https://evil.example"}
    )
    assert queued.status_code == 403
    assert gw.dataset_rows("support")[0]["label_source"] is None
    allowed = await gw.client.post("/v1/feedback", json=label, headers={"origin": "https://console.example"})
    assert allowed.status_code == 202
    assert allowed.headers["access-control-allow-origin"] == "https://console.example"
    own = await gw.client.post("/v1/feedback", json=label, headers={"origin": "http://localhost"})
    assert own.status_code == 202


async def test_cors_is_off_by_default_and_follows_the_allow_list(make_gateway):
    preflight = {
        "origin": "https://console.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    off = await make_gateway()
    r = await off.client.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    evil = await off.client.post(
        "/v1/optimizer/runs", json={"template_id": "support"}, headers={"origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "origin_not_allowed"
    r = await off.client.post("/v1/chat/completions", json=support(), headers={"origin": preflight["origin"]})
    assert "access-control-allow-origin" not in r.headers  # the page cannot read the answer

    on = await make_gateway({"gateway": {"cors": {"allow_origins": ["https://console.example"]}}})
    r = await on.client.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://console.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = await on.client.options(
        "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in r.headers


async def test_key_env_reads_the_key_from_the_environment(make_gateway, monkeypatch):
    monkeypatch.setenv("RSWITCH_TEST_APP_KEY", APP_KEY)
    monkeypatch.setenv("RSWITCH_TEST_ADMIN_KEY", ADMIN_KEY)
    gw = await make_gateway(
        {
            "gateway": {
                "auth": {
                    "keys": [{"name": "env-app", "key_env": "RSWITCH_TEST_APP_KEY"}],
                    "admin_key_env": "RSWITCH_TEST_ADMIN_KEY",
                }
            }
        }
    )
    assert (await gw.post(support(), headers=bearer(APP_KEY))).status_code == 200
    assert (await gw.client.get("/status", headers=bearer(ADMIN_KEY))).status_code == 200
    assert gw.analytics_rows()[0]["client"] == "env-app"


@pytest.mark.parametrize(
    ("auth", "env", "fragment"),
    [
        ({"keys": [{"name": "a", "key_env": "RSWITCH_TEST_UNSET"}]}, {}, "RSWITCH_TEST_UNSET is not set"),
        ({"admin_key_env": "RSWITCH_TEST_SHORT"}, {"RSWITCH_TEST_SHORT": "hunter2"}, "shorter than 32"),
        (
            {"keys": [{"name": "a", "hash": hash_key(APP_KEY)}], "admin_key_hash": hash_key(APP_KEY)},
            {},
            "must differ",
        ),
    ],
)
def test_bad_auth_config_stops_the_start_with_the_key_path(tmp_path, monkeypatch, auth, env, fragment):
    from rswitch.auth import Auth
    from tests.conftest import make_config

    monkeypatch.delenv("RSWITCH_TEST_UNSET", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = make_config(tmp_path, {"gateway": {"auth": auth}})
    with pytest.raises(ConfigError, match=fragment) as exc:
        Auth.from_config(cfg.gateway.auth)
    assert "gateway.auth" in str(exc.value)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ({"name": "a", "hash": "sha256:abc"}, "gateway.auth.keys[0].hash"),
        ({"name": "a"}, "give either hash or key_env"),
        ({"name": "a", "hash": hash_key(APP_KEY), "key_env": "X"}, "give either hash or key_env"),
        ({"name": "a b", "hash": hash_key(APP_KEY)}, "gateway.auth.keys[0].name"),
        ({"name": "a", "key": APP_KEY}, "gateway.auth.keys[0].key"),
    ],
)
def test_key_config_is_validated(tmp_path, key, fragment):
    from tests.conftest import make_config

    with pytest.raises(ConfigError) as exc:
        make_config(tmp_path, {"gateway": {"auth": {"keys": [key]}}})
    assert fragment in str(exc.value)


async def test_keys_never_reach_logs_or_error_bodies(make_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(auth_config())
    answers = [
        await gw.post(support(), headers=bearer(APP_KEY)),
        await gw.post(support(), headers=bearer(APP_KEY[:-1])),
        await gw.client.get("/status", headers=bearer(APP_KEY)),
        await gw.client.get("/status", headers=bearer(ADMIN_KEY)),
    ]
    text = caplog.text + "".join(r.text + str(r.headers) for r in answers)
    for key in (APP_KEY, ADMIN_KEY, APP_KEY[:-1], APP_KEY[4:20]):
        assert key not in text
    assert hash_key(APP_KEY)[7:] not in text  # not even the hashes


def test_analytics_from_before_keys_gain_the_client_column(tmp_path):
    path = tmp_path / "old.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute(
        "CREATE TABLE invocations (request_id VARCHAR, created_at TIMESTAMP, prompt_id VARCHAR, "
        "template_id VARCHAR, combination_id VARCHAR, provider VARCHAR, model VARCHAR, kind VARCHAR, "
        "duration_ms DOUBLE, ttft_ms DOUBLE, success BOOLEAN, status INTEGER, error_type VARCHAR, cost DOUBLE, "
        "prompt_tokens INTEGER, completion_tokens INTEGER, tokens_estimated BOOLEAN, stream BOOLEAN)"
    )
    conn.close()
    store = AnalyticsStore(path)
    try:
        rec = CallRecord("r1", 1.0, "t", "c", "p", "m", "", [], {}, "out", True, extra={"client": "app"})
        store.write([rec])
        assert store._cursor().execute("SELECT client FROM invocations").fetchall() == [("app",)]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("example.com", False),
    ],
)
def test_what_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


async def test_every_route_but_health_needs_a_key_once_keys_are_configured(make_gateway):
    """A new route is guarded too: every POST but the app's two needs the admin key, every GET
    but /health a key (so a route added without `mutation`/`operator`/`reader` fails here)."""
    from starlette.routing import Route

    gw = await make_gateway(auth_config())
    app_posts = {"/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/embeddings"}
    app = gw.client._transport.app  # type: ignore[attr-defined]
    checked = 0
    for route in app.routes:
        if not isinstance(route, Route) or route.path == "/health":
            continue
        path = route.path.replace("{prompt_id}", "support")
        for method in route.methods - {"HEAD"}:
            r = await gw.client.request(method, path, json={} if method == "POST" else None)
            assert r.status_code == 401, (method, path)
            if method == "POST" and path not in app_posts:
                r = await gw.client.request(method, path, json={}, headers=bearer(APP_KEY))
                assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only", (method, path)
            checked += 1
    assert checked >= 14
