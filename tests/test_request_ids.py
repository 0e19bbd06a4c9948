"""Request ids are drawn 256 at a time from the system's random source, and are still what
they were: the 32 hex digits of a random uuid4, never the same twice, across threads too."""

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
