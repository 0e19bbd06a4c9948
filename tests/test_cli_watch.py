"""`rswitch optimize ID --watch`: follow a running gateway's background optimizer over HTTP."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from rswitch.storage.datasets import DatasetStore
from tests.test_mipro import rows
from tests.test_real_server import rswitch_serve

pytestmark = pytest.mark.slow

CONFIG = {
    "model_providers": {"m": {"type": "mock"}},
    "templates": {
        "echo": {"template": "Repeat the user's text for {topic}."},
        "bare": {"template": "Nothing labelled here."},
    },
    "gateway": {
        "combinations": [
            {"id": "echo-m", "template_id": "echo", "model": "m", "provider": "m"},
            {"id": "bare-m", "template_id": "bare", "model": "m", "provider": "m"},
        ],
        # runs only when asked: the periodic check is an hour away and wants more labels than exist
        "optimization": {"enabled": True, "interval_seconds": 3600, "min_new_labels": 1000, "auto": "light"},
    },
}


def rswitch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rswitch", *args], capture_output=True, text=True, timeout=180
    )


def test_watch_requests_a_run_and_prints_every_trial_until_it_ends(tmp_path):
    store = DatasetStore(tmp_path / "prompts", 1000)
    store.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(30)]
    )
    store.close()
    with rswitch_serve(CONFIG, tmp_path) as (url, _):
        out = rswitch("optimize", "echo", "--watch", "--url", url, "--request")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"asked {url} to optimize 'echo'" in out.stdout
        runs = httpx.get(url + "/v1/optimizer/runs", params={"template_id": "echo"}).json()["runs"]
        assert len(runs) == 1
        shown = re.findall(rf"run {runs[0]['run_id']} trial +(\d+)  .*minibatch", out.stdout)
        assert [int(n) for n in shown] == list(range(runs[0]["trials"]))  # each trial once, in order
        assert f"run {runs[0]['run_id']} finished: {runs[0]['verdict']}" in out.stdout

        # a run that cannot start (no labelled rows) ends the watch with its reason, not a hang
        out = rswitch("optimize", "bare", "--watch", "--url", url, "--request")
        assert out.returncode == 1
        assert "the run of 'bare' failed:" in out.stderr and "label" in out.stderr

        out = rswitch("optimize", "ghost", "--watch", "--url", url)
        assert out.returncode == 1 and "has no template 'ghost'" in out.stderr


def test_watch_says_when_the_gateway_is_unreachable_or_the_run_cannot_go_ahead(tmp_path):
    out = rswitch("optimize", "echo", "--watch", "--url", "http://127.0.0.1:9")
    assert out.returncode == 1
    assert "cannot reach the gateway at http://127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr

    # no periodic optimizer configured: serve still runs one on request, which here has no labels
    config = {**CONFIG, "gateway": {"combinations": CONFIG["gateway"]["combinations"]}}
    with rswitch_serve(config, tmp_path) as (url, _):
        out = rswitch("optimize", "echo", "--watch", "--url", url, "--request")
        assert out.returncode == 1
        assert "the run of 'echo' failed" in out.stderr and "labelled inputs" in out.stderr


def test_watch_refuses_options_that_only_a_local_run_uses():
    out = rswitch("optimize", "echo", "--watch", "--trials", "3", "--evaluator", "fuzzy")
    assert out.returncode == 2 and "--trials, --evaluator: only for a run here" in out.stderr
    out = rswitch("optimize", "echo", "--request")
    assert out.returncode == 2 and "go with --watch" in out.stderr
