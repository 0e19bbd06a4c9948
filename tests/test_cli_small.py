"""The command line's small promises: --version, a taken port, names kept, every bad line named,
a bad option refused before anything starts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rswitch import __version__
from rswitch.cli import app

runner = CliRunner()


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "templates": {"classify": {"template": "Classify the message."}},
                "gateway": {
                    "combinations": [{"id": "c", "template_id": "classify", "model": "m", "provider": "m"}]
                },
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "analytics.duckdb")},
            }
        )
    )
    return path


def test_version_prints_the_installed_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"rswitch {__version__}"


@pytest.mark.parametrize("command", [["serve"], ["tui", "--headless"]])
def test_a_taken_port_is_one_clear_line_and_no_traceback(cfg_file, command):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "rswitch",
                *command,
                "-c",
                str(cfg_file),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    assert len(lines) == 1, out.stdout + out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


def test_registering_again_without_name_keeps_the_name(cfg_file, tmp_path):
    args = ["template", "register", "-c", str(cfg_file), "--template-id", "welcome"]
    r = runner.invoke(app, [*args, "--name", "Warm welcome", "--prompt-text", "Hello {user}."])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--prompt-text", "Hi {user}!"])
    assert r.exit_code == 0, r.output
    manifest = yaml.safe_load((tmp_path / "prompts" / "welcome" / "manifest.yaml").read_text())
    assert manifest["version"] == 2 and manifest["template"] == "Hi {user}!"
    assert manifest["name"] == "Warm welcome"
    r = runner.invoke(app, [*args, "--name", "Plain", "--prompt-text", "Hi {user}."])
    manifest = yaml.safe_load((tmp_path / "prompts" / "welcome" / "manifest.yaml").read_text())
    assert manifest["version"] == 3 and manifest["name"] == "Plain"


def test_registering_again_keeps_the_default_model_so_the_template_stays_servable(cfg_file, tmp_path):
    args = ["template", "register", "-c", str(cfg_file), "--template-id", "solo"]
    r = runner.invoke(
        app, [*args, "--prompt-text", "One.", "--default-model", "x", "--default-provider", "m"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*args, "--prompt-text", "Two."])
    assert r.exit_code == 0, r.output
    manifest = yaml.safe_load((tmp_path / "prompts" / "solo" / "manifest.yaml").read_text())
    assert manifest["template"] == "Two."
    assert (manifest["default_model"], manifest["default_provider"]) == ("x", "m")


def test_registering_a_config_template_keeps_its_configured_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_providers": {"m": {"type": "mock"}},
                "templates": {"greet": {"template": "Hello.", "name": "Greeter"}},
                "dataset": {"base_path": str(tmp_path / "prompts")},
            }
        )
    )
    r = runner.invoke(
        app, ["template", "register", "-c", str(path), "--template-id", "greet", "--prompt-text", "Hi."]
    )
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "prompts" / "greet" / "manifest.yaml").read_text())["name"] == "Greeter"


def test_dataset_import_names_every_bad_line_and_imports_nothing(cfg_file, tmp_path):
    src = tmp_path / "labels.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"input": "fine", "expected": "a"}),
                "{not json",
                json.dumps({"input": "ok", "expected": "b"}),
                json.dumps({"input": "x", "score": 7}),
                json.dumps({"messages": []}),
                json.dumps({"input": "y", "expected": "c", "output": {"not": "text"}}),
            ]
        )
        + "\n"
    )
    r = runner.invoke(app, ["dataset", "import", "classify", str(src), "-c", str(cfg_file)])
    assert r.exit_code != 0
    assert "4 bad lines; nothing imported" in r.output
    assert ":6: 'output' must be a string" in r.output
    assert ":2: not valid JSON" in r.output
    assert ":4: 'score' must be a number from 0 to 1" in r.output
    assert ":5: 'messages' must be a non-empty array" in r.output
    assert ":1:" not in r.output and ":3:" not in r.output
    assert not (tmp_path / "prompts" / "classify" / "dataset.sqlite").exists()


def test_a_bogus_evaluator_is_refused_before_anything_starts(cfg_file, tmp_path):
    r = runner.invoke(app, ["optimize", "classify", "--evaluator", "bogus", "-c", str(cfg_file)])
    assert r.exit_code == 2
    assert r.output.startswith("unknown evaluator 'bogus'; choose one of: similarity, exact_match")
    assert "trial" not in r.output  # no progress bar was drawn
    assert not (tmp_path / "analytics.duckdb").exists()  # no gateway was started


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_serve_on_ipv6_prints_a_url_that_works(cfg_file):
    import re

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "rswitch", "serve", "-c", str(cfg_file), "--addr", "[::1]:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        m = re.search(r"listening on (\S+)", first)
        assert m and re.fullmatch(r"http://\[::1\]:\d+", m.group(1)), first
        assert httpx.get(m.group(1) + "/health", timeout=10).json() == {"status": "healthy"}
    finally:
        proc.terminate()
        proc.wait(30)
