"""The CLI while a gateway runs: `rswitch serve` (and `rswitch tui`) record that they own the data
directory in `<data dir>/rswitch.lock`, and `optimize`, `package export|import`, `dataset
import|export` and `template register|rollback` run from another shell go through its admin API
(saying so on stderr) instead of fighting over its DuckDB file; the gateway serves what they
did at once. A stale lock (process gone, or nothing answering) is ignored and replaced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from rswitch.admin import lock
from rswitch.admin.api import PREFIX
from rswitch.auth import hash_key, new_key
from rswitch.storage.datasets import DatasetStore
from tests.test_mipro import rows
from tests.test_real_server import rswitch_serve

pytestmark = pytest.mark.slow

ADMIN_KEY = new_key()
AS_ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}

CONFIG: dict[str, Any] = {
    "model_providers": {"m": {"type": "mock"}},
    "templates": {"echo": {"template": "Repeat the user's text for {topic}."}},
    "gateway": {
        "auth": {"admin_key_hash": hash_key(ADMIN_KEY)},
        "combinations": [{"id": "echo-m", "template_id": "echo", "model": "m", "provider": "m"}],
        # runs only when asked: the periodic check is an hour away and wants more labels than exist
        "optimization": {"enabled": True, "interval_seconds": 3600, "min_new_labels": 1000, "auto": "light"},
    },
}


def rswitch(*args: str, key: str | None = ADMIN_KEY, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RSWITCH_ADMIN_KEY"}
    if key is not None:
        env["RSWITCH_ADMIN_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "rswitch", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def labelled_file(path: Path, n: int = 30) -> Path:
    path.write_bytes(
        b"".join(
            orjson.dumps({"messages": e.messages, "variables": e.variables, "expected": e.expected}) + b"\n"
            for e in rows(n)
        )
    )
    return path


def served_prompt(url: str, template_id: str, variables: dict[str, str]) -> str:
    """The system prompt the gateway rendered for a call to `template_id` now."""
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"template_id": template_id},
            "variables": variables,
        },
    )
    assert r.status_code == 200, r.text
    call = httpx.get(f"{url}{PREFIX}/calls/{r.headers['x-rswitch-request-id']}", headers=AS_ADMIN)
    return call.json()["system_prompt"]


def test_the_cli_goes_through_a_running_gateway(tmp_path: Path) -> None:
    cfg = str(tmp_path / "config.yaml")  # rswitch_serve writes it; the CLI reads the same one
    data_dir = tmp_path / "prompts"
    with rswitch_serve(CONFIG, tmp_path) as (url, proc):
        owner = lock.read(data_dir)
        assert owner is not None and (owner.pid, owner.admin_url) == (proc.pid, url)
        through = f"through the running gateway at {url}"

        out = rswitch("dataset", "import", "echo", str(labelled_file(tmp_path / "labels.jsonl")), "-c", cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        assert through in out.stderr
        assert "imported 30 example(s) into 'echo' (30 labelled)" in out.stdout
        served = httpx.get(
            f"{url}{PREFIX}/datasets/echo/export", params={"labelled": "true"}, headers=AS_ADMIN
        )
        assert len(served.content.splitlines()) == 30

        out = rswitch("dataset", "export", "echo", "--labelled", "-o", str(tmp_path / "out.jsonl"), "-c", cfg)
        assert out.returncode == 0, out.stderr
        assert through in out.stderr and "wrote 30 example(s)" in out.stderr
        assert (tmp_path / "out.jsonl").read_bytes() == served.content

        out = rswitch("dataset", "export", "ghost", "-c", cfg)  # the gateway's refusal, as one line
        assert out.returncode == 2 and "unknown template id 'ghost' (known: echo)" in out.stderr
        assert "Traceback" not in out.stderr

        out = rswitch("optimize", "echo", "-c", cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        assert through in out.stderr and f"asked {url} to optimize 'echo'" in out.stdout
        runs = httpx.get(f"{url}{PREFIX}/optimizer/runs", params={"template_id": "echo"}, headers=AS_ADMIN)
        run = runs.json()["runs"][0]
        assert f"run {run['run_id']} trial   0" in out.stdout
        assert f"run {run['run_id']} finished: {run['verdict']}" in out.stdout
        out = rswitch("optimize", "echo", "--trials", "3", "-c", cfg)
        assert out.returncode == 2 and "--trials: only for a run here" in out.stderr

        out = rswitch(
            "template", "register", "--template-id", "faq", "--prompt-text", "Answer FAQs about {product}.",
            "--default-model", "m", "--default-provider", "m", "-c", cfg,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert through in out.stderr and "registered template 'faq' version 1" in out.stdout
        assert served_prompt(url, "faq", {"product": "Acme"}) == "Answer FAQs about Acme."
        rswitch(
            "template",
            "register",
            "--template-id",
            "faq",
            "--prompt-text",
            "FAQ bot for {product}.",
            "-c",
            cfg,
        )
        assert served_prompt(url, "faq", {"product": "Acme"}) == "FAQ bot for Acme."
        out = rswitch("template", "rollback", "faq", "1", "-c", cfg)
        assert out.returncode == 0, out.stderr
        assert through in out.stderr and "template 'faq' is now version 3, a copy of version 1" in out.stdout
        assert served_prompt(url, "faq", {"product": "Acme"}) == "Answer FAQs about Acme."

        # with analytics: the served calls above are in the gateway's DuckDB file
        packages = tmp_path / "packages"
        out = rswitch(
            "package", "export", "--template-id", "faq", "--output-dir", str(packages), "--archive", "-c", cfg
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert through in out.stderr
        [archive] = packages.iterdir()
        assert archive.name.startswith("faq-") and archive.name.endswith(".tar.gz")
        assert f"exported 'faq' → {archive}" in out.stdout
        out = rswitch("package", "export", "--template-id", "faq", "--output-dir", str(packages), "-c", cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        [folder] = [p for p in packages.iterdir() if p.is_dir()]
        assert folder.name.startswith("faq-") and f"exported 'faq' → {folder}" in out.stdout
        for package in (archive, folder):
            inspected = rswitch("package", "inspect", str(package))
            assert inspected.returncode == 0, inspected.stdout + inspected.stderr
            assert "analytics.parquet" in inspected.stdout and "checks      OK" in inspected.stdout

        rswitch(
            "template", "register", "--template-id", "faq", "--prompt-text", "Changed {product}.", "-c", cfg
        )
        out = rswitch("package", "import", str(archive), "--overwrite", "-c", cfg)
        assert out.returncode == 0, out.stdout + out.stderr
        assert through in out.stderr and "replaced 'faq'" in out.stdout
        assert served_prompt(url, "faq", {"product": "Acme"}) == "Answer FAQs about Acme."
        out = rswitch("package", "import", str(archive), "-c", cfg)
        assert out.returncode == 2 and "import refused" in out.stderr and "already exists" in out.stderr

        # the gateway's admin key is needed, and nothing changes without it
        before = httpx.get(f"{url}{PREFIX}/templates/faq/history", headers=AS_ADMIN).json()
        out = rswitch("template", "rollback", "faq", "1", "-c", cfg, key=None)
        assert out.returncode == 1 and "set RSWITCH_ADMIN_KEY" in out.stderr
        out = rswitch("template", "rollback", "faq", "1", "-c", cfg, key="sk-not-the-admin-key")
        assert out.returncode == 1 and "set RSWITCH_ADMIN_KEY" in out.stderr
        assert "sk-not-the-admin-key" not in out.stdout + out.stderr
        assert httpx.get(f"{url}{PREFIX}/templates/faq/history", headers=AS_ADMIN).json() == before

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not lock.lock_path(data_dir).exists()  # removed on a graceful stop


def test_a_stale_lock_is_ignored_and_replaced(tmp_path: Path) -> None:
    data_dir = tmp_path / "prompts"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write(data_dir, "http://127.0.0.1:9")
    path = lock.lock_path(data_dir)
    path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), "pid": gone.pid}))
    config = {
        **CONFIG,
        "dataset": {"base_path": str(data_dir)},
        "analytics": {"path": str(tmp_path / "analytics.duckdb")},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))

    out = rswitch("dataset", "import", "echo", str(labelled_file(tmp_path / "l.jsonl", 3)), "-c", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "through the running gateway" not in out.stderr  # worked on the files directly
    store = DatasetStore(data_dir, 1000)
    assert len(store.recent("echo")) == 3
    store.close()

    lock.write(data_dir, "http://127.0.0.1:9")  # a live process (this one), but no gateway answers there
    out = rswitch("template", "register", "--template-id", "faq", "--prompt-text", "FAQ.", "-c", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "through the running gateway" not in out.stderr
    assert (data_dir / "faq" / "manifest.yaml").is_file()

    with rswitch_serve(config, tmp_path) as (url, proc):
        owner = lock.read(data_dir)
        assert owner is not None and (owner.pid, owner.admin_url) == (proc.pid, url)  # replaced
        out = rswitch("dataset", "export", "echo", "-c", str(cfg))
        assert out.returncode == 0 and f"through the running gateway at {url}" in out.stderr
        assert len(out.stdout.splitlines()) == 3

        second = subprocess.run(
            [sys.executable, "-m", "rswitch", "serve", "-c", str(cfg), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"belongs to the gateway at {url} (pid {proc.pid}" in second.stderr


def test_the_console_owns_its_data_directory_too(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "prompts"
    config = {
        **CONFIG,
        "dataset": {"base_path": str(data_dir)},
        "analytics": {"path": str(tmp_path / "analytics.duckdb")},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    console = subprocess.Popen(
        [sys.executable, "-m", "rswitch", "tui", "-c", str(cfg), "--port", "0", "--headless"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        owner = None
        for _ in range(600):  # until the console's gateway answers (at most ~60 s)
            owner = lock.live_owner(data_dir)
            if owner is not None or console.poll() is not None:
                break
            time.sleep(0.1)  # polling for the lock, a condition the test then asserts
        assert owner is not None and owner.pid == console.pid, console.poll()
        out = rswitch(
            "template", "register", "--template-id", "faq", "--prompt-text", "FAQ {product}.",
            "--default-model", "m", "--default-provider", "m", "-c", str(cfg),
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"through the running gateway at {owner.admin_url}" in out.stderr
        assert served_prompt(owner.admin_url, "faq", {"product": "Acme"}) == "FAQ Acme."
    finally:
        console.send_signal(signal.SIGTERM)
        console.wait(60)
    assert console.returncode == 0, console.stdout.read() if console.stdout else ""
    assert not lock.lock_path(data_dir).exists()


def test_lock_file_is_whole_and_only_its_writer_removes_it(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    owner = lock.write(tmp_path, lock.admin_url("0.0.0.0", port))
    assert owner.admin_url == f"http://127.0.0.1:{port}" and owner.pid == os.getpid()
    assert lock.read(tmp_path) == owner
    assert [p.name for p in tmp_path.iterdir()] == ["rswitch.lock"]  # no temporary file left
    assert (
        lock.admin_url("::", 1) == "http://[::1]:1" and lock.admin_url("10.0.0.2", 1) == "http://10.0.0.2:1"
    )
    assert lock.live_owner(tmp_path) is None  # a live process, but no gateway answers
    lock.lock_path(tmp_path).write_text('{"pid": 1, "admin_url": "http://127.0.0.1:1"}')
    lock.remove(tmp_path)  # another process's lock stays
    assert lock.read(tmp_path) is not None
    lock.lock_path(tmp_path).write_text("{not json")
    assert lock.read(tmp_path) is None and lock.live_owner(tmp_path) is None
