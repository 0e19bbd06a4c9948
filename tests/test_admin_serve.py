"""The admin API on a real `rswitch serve` with an admin key, as a remote operator meets it:
keys refused, an action's event on the SSE stream, routing that follows a reweight, a package
built by the server that `rswitch package inspect` accepts and a second gateway imports, and
the event stream closed when the gateway stops."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from rswitch.admin import actions, views
from rswitch.admin.api import PREFIX
from rswitch.auth import hash_key, new_key
from tests.test_real_server import rswitch_serve

pytestmark = pytest.mark.slow

ADMIN_KEY = new_key()
AS_ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
SUPPORT = {"product": "Acme", "tone": "kind"}

CONFIG: dict[str, Any] = {
    "model_providers": {"mock": {"type": "mock"}},
    "templates": {"support": {"template": "You support {product}. Be {tone}."}},
    "gateway": {
        "auth": {"admin_key_hash": hash_key(ADMIN_KEY)},
        "combinations": [
            {"id": "sup-a", "template_id": "support", "model": "small", "provider": "mock", "weight": 1},
            {"id": "sup-b", "template_id": "support", "model": "large", "provider": "mock", "weight": 1},
        ],
    },
}


def ask(url: str, n: int = 8) -> set[str]:
    served = set()
    for _ in range(n):
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "support", "messages": [{"role": "user", "content": "hi"}], "variables": SUPPORT},
            headers=AS_ADMIN,
        )
        assert r.status_code == 200, r.text
        served.add(r.headers["x-rswitch-combination"])
    return served


def read_events(url: str, out: queue.Queue[Any]) -> None:
    """Every SSE line of /admin/v1/events onto `out`, then None when the stream ends."""
    try:
        with httpx.stream("GET", url + PREFIX + "/events", headers=AS_ADMIN, timeout=30) as r:
            out.put(("status", r.status_code))
            for line in r.iter_lines():
                out.put(line)
    except httpx.HTTPError as exc:
        out.put(("error", repr(exc)))
    out.put(None)


def next_event(lines: queue.Queue[Any], kind: str = "event") -> dict[str, Any] | None:
    """The data of the next SSE message of `kind`; None if the stream ended first."""
    current = None
    while True:
        line = lines.get(timeout=30)
        if line is None:
            return None
        if isinstance(line, str) and line.startswith("event: "):
            current = line[7:]
        elif isinstance(line, str) and line.startswith("data: ") and current == kind:
            return orjson.loads(line[6:])


def test_admin_api_on_a_real_server(tmp_path: Path) -> None:
    for d in ("downloaded", "one", "two"):
        (tmp_path / d).mkdir()
    package_dir = tmp_path / "downloaded"
    with rswitch_serve(CONFIG, tmp_path / "one") as (url, proc):
        assert httpx.get(url + PREFIX + "/snapshot").status_code == 401
        wrong = httpx.get(
            url + PREFIX + "/snapshot", headers={"authorization": "Bearer sk-not-the-admin-key"}
        )
        assert wrong.status_code == 403
        refused = httpx.post(url + PREFIX + "/combinations/sup-a/disable")
        assert refused.status_code == 401
        spec = httpx.get(url + PREFIX + "/openapi.json", headers=AS_ADMIN).json()
        assert PREFIX + "/snapshot" in spec["paths"]

        lines: queue.Queue[Any] = queue.Queue()
        reader = threading.Thread(target=read_events, args=(url, lines), daemon=True)
        reader.start()
        assert lines.get(timeout=30) == ("status", 200)
        assert lines.get(timeout=30).startswith(":")  # the stream is open before anything happens

        assert ask(url) == {"sup-a", "sup-b"}
        r = httpx.post(url + PREFIX + "/combinations/sup-a/weight", json={"weight": 0}, headers=AS_ADMIN)
        assert r.status_code == 200
        assert ask(url) == {"sup-b"}
        event = views.Event.model_validate(next_event(lines))
        assert event.kind == "operator" and event.text == "weight of sup-a set to 0"

        snap = views.ConsoleSnapshot.model_validate(
            httpx.get(url + PREFIX + "/snapshot", headers=AS_ADMIN).json()
        )
        assert {c.id: c.weight for c in snap.combinations} == {"sup-a": 0, "sup-b": 1}

        exported = httpx.post(
            url + PREFIX + "/packages/export", json={"template_id": "support"}, headers=AS_ADMIN
        )
        assert exported.status_code == 200, exported.text
        name = exported.headers["content-disposition"].split("filename=")[1].strip('"')
        assert name.startswith("support-") and name.endswith(".tar.gz")
        package = package_dir / name
        package.write_bytes(exported.content)

        proc.send_signal(signal.SIGTERM)
        assert next_event(lines, "shutdown") == {}  # said so, then closed: not cut by a timeout
        reader.join(30)
        assert proc.wait(30) == 0

    inspected = subprocess.run(
        [sys.executable, "-m", "rswitch", "package", "inspect", str(package)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert "checks      OK" in inspected.stdout

    second = {**CONFIG, "templates": {}, "gateway": {**CONFIG["gateway"], "combinations": []}}
    with rswitch_serve(second, tmp_path / "two") as (url, _):
        done = httpx.post(
            url + PREFIX + "/packages/import",
            content=package.read_bytes(),
            headers={**AS_ADMIN, "content-type": "application/gzip"},
        )
        assert done.status_code == 200, done.text
        imported = actions.PackageImported.model_validate(done.json())
        assert imported.template_id == "support" and imported.dataset_rows == 16
        history = httpx.get(url + PREFIX + "/templates/support/history", headers=AS_ADMIN).json()
        assert history["versions"][-1]["template"] == "You support {product}. Be {tone}."
