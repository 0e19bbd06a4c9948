"""Imports point one way: the core never pulls in a face's framework."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["rswitch.core", "rswitch.gateway.pipeline", "rswitch.storage.writer", "rswitch.config"]
)
def test_lower_layers_do_not_import_web_framework_or_tui(module):
    code = f"import sys, {module}; bad = [m for m in ('starlette', 'uvicorn', 'textual', 'typer') if m in sys.modules]; print(','.join(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_serve_path_does_not_import_textual():
    code = "import sys, rswitch.cli, rswitch.server; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
