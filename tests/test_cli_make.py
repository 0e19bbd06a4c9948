"""`make`'s llama.cpp build shows its progress as it happens, line by line, not in bursts.

The build is not run: a fake Python stands in for `pip wheel`, prints one compiler line and
then waits until the test has seen that line come out of the Makefile's filter pipe."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PIP = """#!/bin/sh
echo "[1/2] /usr/bin/c++ -O3 -o ggml.o -c /src/ggml/ggml.c"
i=0
while [ ! -e "$RELEASE" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if [ -e "$RELEASE" ]; then what=shown_while_building.cpp; else what=held_back_until_the_end.cpp; fi
echo "[2/2] /usr/bin/c++ -O3 -o x.o -c /src/$what"
echo "Successfully built llama-cpp-python"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_llama_build_progress_streams_through_the_filter(tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PIP)
    fake.chmod(0o755)
    release = tmp_path / "release"
    proc = subprocess.Popen(
        [
            "make",
            "-s",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "llama-wheel",
            f"PY={fake}",
            f"WHEELS={tmp_path / 'w'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RELEASE": str(release)},
    )
    try:
        assert proc.stdout.readline().startswith("Building llama-cpp-python")
        # the producer is still waiting: this line can only arrive if every stage passed it on
        assert proc.stdout.readline() == "  [1/2] compiling ggml.c\n"
        release.touch()
        rest = proc.stdout.read()
    finally:
        release.touch()
        proc.wait(60)
    assert "  [2/2] compiling shown_while_building.cpp\n" in rest
    assert "Successfully built llama-cpp-python" in rest
    assert proc.returncode == 0
