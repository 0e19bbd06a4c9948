"""An error of rswitch's own is a logged 500 in OpenAI's shape, and the client's keep-alive
connection survives it: the next request on the same connection is answered."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlparse

import orjson
import pytest

from rswitch.core import Core
from rswitch.tui.server import GatewayThread
from tests.conftest import SUPPORT_VARS, chat, make_config


def http_post(sock: socket.socket, host: str, path: str, body: Any) -> tuple[int, bytes]:
    data = orjson.dumps(body)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-answer")
        rest += chunk
    return int(lines[0].split()[1]), rest[:length]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/feedback"])
def test_an_internal_error_is_a_500_and_the_connection_keeps_serving(tmp_path, monkeypatch, caplog, path):
    core = Core(make_config(tmp_path, {"gateway": {"embeddings": {"provider": "mock", "model": "m"}}}))
    thread = GatewayThread(core, "127.0.0.1", 0)
    url = urlparse(thread.start())
    try:
        broken = {"count": 0}

        async def bug(*args: Any, **kwargs: Any) -> Any:
            broken["count"] += 1
            raise RuntimeError("a bug of ours")

        target = {"/v1/chat/completions": "complete", "/v1/embeddings": "embed"}.get(path)
        if target:
            monkeypatch.setattr(core.gateway, target, bug)
        else:
            monkeypatch.setattr(core, "feedback", bug)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            body = {
                **chat("x", model="support-a", variables=SUPPORT_VARS),
                "input": "x",
                "model": "support-a",
            }
            status, answer = http_post(sock, url.netloc, path, body)
            assert status == 500 and broken["count"] == 1
            err = orjson.loads(answer)["error"]
            assert err["type"] == "server_error" and "RuntimeError" in err["message"]
            assert "a bug of ours" not in err["message"]  # internals stay in the log
            monkeypatch.undo()
            status, _ = http_post(
                sock, url.netloc, "/v1/chat/completions", chat("y", model="support-a", variables=SUPPORT_VARS)
            )
            assert status == 200
        logged = [r for r in caplog.records if r.exc_info and str(r.exc_info[1]) == "a bug of ours"]
        assert len(logged) == 1 and f"POST {path}" in logged[0].getMessage()  # the traceback, once
    finally:
        thread.stop()
