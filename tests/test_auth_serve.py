"""Keys on a real `rswitch serve` with the official `openai` SDK as the app, and the refusal to
listen beyond loopback without keys, as an operator would meet them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import pytest
import yaml

from rswitch.auth import hash_key, new_key
from tests.test_real_server import rswitch_serve

pytestmark = pytest.mark.slow

APP_KEY = new_key()
ADMIN_KEY = new_key()
SUPPORT = {"product": "Acme", "tone": "kind"}

BASE: dict[str, Any] = {
    "model_providers": {"mock": {"type": "mock"}},
    "templates": {"support": {"template": "You support {product}. Be {tone}."}},
    "gateway": {
        "combinations": [{"id": "sup", "template_id": "support", "model": "small", "provider": "mock"}]
    },
}


def with_keys(**auth: Any) -> dict[str, Any]:
    cfg = {**BASE, "gateway": {**BASE["gateway"], "auth": auth}}
    return cfg


KEYED = with_keys(keys=[{"name": "shop", "hash": hash_key(APP_KEY)}], admin_key_hash=hash_key(ADMIN_KEY))


def test_openai_sdk_with_a_client_key_against_a_real_server(tmp_path):
    with rswitch_serve(KEYED, tmp_path) as (url, proc):
        app = openai.OpenAI(base_url=url + "/v1", api_key=APP_KEY, max_retries=0)
        extra = {"variables": SUPPORT}
        answer = app.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "hi"}], extra_body=extra
        )
        assert answer.choices[0].message.content
        chunks = list(
            app.chat.completions.create(
                model="support", messages=[{"role": "user", "content": "hi"}], extra_body=extra, stream=True
            )
        )
        assert chunks[-1].usage is not None
        stranger = openai.OpenAI(base_url=url + "/v1", api_key="sk-not-a-key-of-this-gateway", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError, match="not valid"):
            stranger.chat.completions.create(
                model="support", messages=[{"role": "user", "content": "hi"}], extra_body=extra
            )
        with pytest.raises(openai.PermissionDeniedError):
            stranger.models.list()
        assert [m.id for m in app.models.list()]
        assert httpx.get(url + "/status", headers={"authorization": f"Bearer {APP_KEY}"}).status_code == 403
        status = httpx.get(url + "/status", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert status.status_code == 200
        assert httpx.get(url + "/health").status_code == 200
    output = proc.output  # type: ignore[attr-defined]
    assert "auth        1 client key(s), admin key set" in output
    for key in (APP_KEY, ADMIN_KEY, "sk-not-a-key-of-this-gateway"):
        assert key not in output
    conn = duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True)
    try:
        assert conn.execute("SELECT client, stream FROM invocations ORDER BY stream").fetchall() == [
            ("shop", False),
            ("shop", True),
        ]
    finally:
        conn.close()


def start(cmd: str, config: dict[str, Any], tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    path = tmp_path / "config.yaml"
    config = {
        **config,
        "dataset": {"base_path": str(tmp_path / "prompts")},
        "analytics": {"path": str(tmp_path / "analytics.duckdb")},
    }
    path.write_text(yaml.safe_dump(config))
    base_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.Popen(
        [sys.executable, "-m", "rswitch", cmd, "--config", str(path), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**base_env, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@pytest.mark.parametrize("cmd", ["serve", "tui"])
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_listening_beyond_loopback_without_keys_is_refused_in_one_line(tmp_path, cmd, host):
    proc = start(cmd, BASE, tmp_path, "--host", host)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"refusing to listen on {host}" in lines[0]
    assert "client keys (gateway.auth.keys) and an admin key" in lines[0]
    assert "--insecure-no-auth" in lines[0]
    assert "listening on" not in out


def test_only_client_keys_beyond_loopback_names_the_missing_admin_key(tmp_path):
    cfg = with_keys(keys=[{"name": "shop", "hash": hash_key(APP_KEY)}])
    proc = start("serve", cfg, tmp_path, "--host", "0.0.0.0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "configure an admin key (gateway.auth.admin_key_env)" in err
    assert "client keys (gateway" not in err


def _serves(proc: subprocess.Popen) -> str:
    """Wait for the start-up line, then stop the server; return what it printed."""
    lines = []
    try:
        while line := proc.stdout.readline():
            lines.append(line)
            if "press Ctrl+C" in line:  # the start-up summary's last line
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    return "".join(lines) + out + err


@pytest.mark.parametrize(
    ("config", "args"),
    [(KEYED, ()), (BASE, ("--insecure-no-auth",))],
    ids=["with-keys", "insecure-no-auth"],
)
def test_listening_beyond_loopback_starts_with_keys_or_when_told(tmp_path, config, args):
    proc = start("serve", config, tmp_path, "--host", "0.0.0.0", *args)
    printed = _serves(proc)
    assert re.search(r"listening on http://0\.0\.0\.0:\d+", printed), printed


def test_loopback_stays_key_free(tmp_path):
    proc = start("serve", BASE, tmp_path, "--host", "127.0.0.1")
    printed = _serves(proc)
    assert "listening on http://127.0.0.1:" in printed
    assert "no client keys (app endpoints open), no admin key" in printed


def test_an_unset_key_variable_stops_the_start(tmp_path):
    cfg = with_keys(admin_key_env="RSWITCH_TEST_ADMIN_UNSET")
    proc = start("serve", cfg, tmp_path, "--host", "127.0.0.1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "gateway.auth.admin_key_env: environment variable RSWITCH_TEST_ADMIN_UNSET is not set" in err


def test_key_create_prints_a_new_key_once_and_its_config_line(tmp_path):
    def create(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "rswitch", "key", "create", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = create("shop")
    key = re.search(r"^\s+(rsk-\S+)$", out, re.M).group(1)
    snippet = out[out.index("gateway:") : out.index("clients send it")]
    cfg = yaml.safe_load(snippet)
    assert cfg == {"gateway": {"auth": {"keys": [{"name": "shop", "hash": hash_key(key)}]}}}
    assert key not in create("shop")  # a new key each time
    admin = create("ops", "--admin")
    admin_key = re.search(r"^\s+(rsk-\S+)$", admin, re.M).group(1)
    assert f'admin_key_hash: "{hash_key(admin_key)}"' in admin
    bad = subprocess.run(
        [sys.executable, "-m", "rswitch", "key", "create", "a b"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "key name must be" in bad.stderr


def test_optimize_watch_sends_the_admin_key_from_the_environment(tmp_path):
    def watch(env: dict[str, str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "rswitch", "optimize", "support", "--watch", "--url", url, "--request"]
        base = {k: v for k, v in os.environ.items() if k != "RSWITCH_ADMIN_KEY"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**base, **env})

    optimizing = {"interval_seconds": 3600, "min_new_labels": 1000, "enabled": True}
    config = {**KEYED, "gateway": {**KEYED["gateway"], "optimization": optimizing}}
    with rswitch_serve(config, tmp_path) as (url, _):
        without = watch({})
        assert without.returncode == 1
        assert "missing API key" in without.stderr and "set RSWITCH_ADMIN_KEY" in without.stderr
        wrong = watch({"RSWITCH_ADMIN_KEY": APP_KEY})
        assert wrong.returncode == 1 and "needs the admin key" in wrong.stderr
        admin = watch({"RSWITCH_ADMIN_KEY": ADMIN_KEY})
        assert admin.returncode == 1  # past the keys: the run fails for want of labelled rows
        assert f"asked {url} to optimize 'support'" in admin.stdout, admin.stderr
        assert "the run of 'support' failed:" in admin.stderr
        for out in (without, wrong, admin):
            assert ADMIN_KEY not in out.stdout + out.stderr and APP_KEY not in out.stdout + out.stderr


def test_rswitch_load_sends_the_client_key_from_the_environment(tmp_path):
    bodies = tmp_path / "bodies.jsonl"
    body = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "variables": SUPPORT}
    bodies.write_text(json.dumps(body) + "\n")

    def load(env: dict[str, str]) -> dict[str, Any]:
        cmd = [
            sys.executable,
            "-m",
            "rswitch",
            "load",
            "--url",
            url,
            "--file",
            str(bodies),
            "-n",
            "3",
            "--json",
        ]
        base = {k: v for k, v in os.environ.items() if k != "RSWITCH_API_KEY"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**base, **env})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    with rswitch_serve(KEYED, tmp_path) as (url, _):
        assert load({})["errors"] == {"HTTP 401 missing_api_key": 3}
        summary = load({"RSWITCH_API_KEY": APP_KEY})
        assert summary["succeeded"] == 3 and summary["errors"] == {}
