"""`rswitch tui` when the console itself fails: a non-zero exit, a clear line, and the traceback in
the log file (not only on a terminal the console had just taken over)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import BASE_CONFIG

pytestmark = pytest.mark.slow

CRASHING = """
import sys
import rswitch.tui.app as console

def crash(self):
    raise RuntimeError("boom at mount")

console.RSwitchApp.on_mount = crash
from rswitch.cli import app
app(sys.argv[1:], prog_name="rswitch")
"""


def test_a_console_that_ends_on_an_error_exits_non_zero_and_logs_the_traceback(tmp_path):
    config = dict(BASE_CONFIG)
    config["dataset"] = {"base_path": str(tmp_path / "data" / "prompts")}
    config["analytics"] = {"path": str(tmp_path / "analytics.duckdb")}
    config_file = tmp_path / "rswitch.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-c", CRASHING, "tui", "--config", str(config_file), "--port", "0", "--headless"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    log_file = tmp_path / "data" / "rswitch-tui.log"
    assert f"the console stopped on an error; its traceback is in {log_file}" in done.stderr
    log = log_file.read_text(encoding="utf-8")
    assert "the console stopped on an error" in log
    assert "Traceback" in log and "RuntimeError: boom at mount" in log
