"""The chat request path, made cheaper, answers as before: request ids are drawn 256 at a time
from the system's random source and are still the 32 hex digits of a random uuid4, never the
same twice; POST /v1/chat/completions goes straight to its handler (no router), inside the Host
guard and CORS, and every other method or path goes through the app as before."""

from __future__ import annotations

import threading
import uuid

from rswitch.gateway.pipeline import new_request_id


def test_request_ids_are_distinct_uuid4_hex_across_threads():
    got: list[list[str]] = [[] for _ in range(4)]

    def draw(out: list[str]) -> None:
        out.extend(new_request_id() for _ in range(5_000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for out in got for i in out]
    assert len(set(ids)) == len(ids) == 20_000
    for i in ids:
        u = uuid.UUID(hex=i)
        assert (u.version, u.variant, u.hex) == (4, uuid.RFC_4122, i)


async def test_a_chat_answer_names_its_request_by_such_an_id(make_gateway):
    from tests.conftest import SUPPORT_VARS, chat

    gw = await make_gateway()
    ids = set()
    for n in range(3):
        r = await gw.post(chat(f"q{n}", model="support", variables=SUPPORT_VARS))
        assert r.status_code == 200, r.text
        ids.add(r.headers["x-rswitch-request-id"])
    assert len(ids) == 3 and all(uuid.UUID(hex=i).version == 4 for i in ids)
    gw.flush()
    assert {row["request_id"] for row in gw.dataset_rows("support")} == ids


async def test_chat_completions_answer_inside_cors_and_other_methods_still_reach_the_router(make_gateway):
    from tests.conftest import SUPPORT_VARS, chat

    origin = "https://console.example"
    gw = await make_gateway({"gateway": {"cors": {"allow_origins": [origin]}}})
    for path in ("/v1/chat/completions", "/chat/completions"):
        r = await gw.client.post(
            path, json=chat("hello", model="support", variables=SUPPORT_VARS), headers={"origin": origin}
        )
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        assert "x-rswitch-request-id" in r.headers["access-control-expose-headers"].lower()
    bad = await gw.client.post(
        "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    r = await gw.client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert (await gw.client.post("/v1/chat/completion", json={})).status_code == 404
