"""`rswitch optimize ID --watch` prints what the run did in the order it did it: a fast run seen
for the first time at "testing the winner" printed that stage above trials 0–9."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import httpx
import pytest

from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.storage.datasets import DatasetStore
from rswitch.tui.server import GatewayThread
from tests.test_cli_watch import CONFIG
from tests.test_mipro import rows

pytestmark = pytest.mark.slow


def test_a_run_first_seen_testing_the_winner_prints_its_trials_before_that_stage(tmp_path):
    store = DatasetStore(tmp_path / "prompts", 1000)
    store.import_rows(
        "echo", [{"messages": e.messages, "variables": e.variables, "expected": e.expected} for e in rows(30)]
    )
    store.close()
    core = Core(
        parse_config(
            {
                **CONFIG,
                "dataset": {"base_path": str(tmp_path / "prompts")},
                "analytics": {"path": str(tmp_path / "analytics.duckdb")},
                "recorder": {"flush_interval_ms": 20},
            }
        )
    )
    gateway = GatewayThread(core, "127.0.0.1", 0)
    url = gateway.start()
    # The run holds at "testing the winner" until the watcher has printed it: the watcher's first
    # look at the run is then after all its trials, as with a run that is over in a second.
    at_winner, release = threading.Event(), threading.Event()
    scheduler = core.optimizer
    record_stage = scheduler._on_stage

    def held(name: str) -> None:
        record_stage(name)
        if name == "testing the winner":
            at_winner.set()
            release.wait(120)

    scheduler._on_stage = held
    watcher = None
    try:
        scheduler.request("echo")
        assert at_winner.wait(120), "the run never reached 'testing the winner'"
        watcher = subprocess.Popen(
            [sys.executable, "-m", "rswitch", "optimize", "echo", "--watch", "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        for line in watcher.stdout:
            lines.append(line.rstrip("\n"))
            if "testing the winner" in line:
                break
        release.set()
        rest, err = watcher.communicate(timeout=120)
        lines += rest.splitlines()
        assert watcher.returncode == 0, "\n".join(lines) + err
        [run] = httpx.get(url + "/v1/optimizer/runs", params={"template_id": "echo"}).json()["runs"]
    finally:
        release.set()
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        gateway.stop()

    trials = [i for i, line in enumerate(lines) if re.match(rf"run {run['run_id']} trial +\d+ ", line)]
    [stage] = [i for i, line in enumerate(lines) if line == "'echo': testing the winner…"]
    [end] = [i for i, line in enumerate(lines) if line.startswith(f"run {run['run_id']} finished:")]
    assert len(trials) == run["trials"] > 0
    assert max(trials) < stage < end, "\n".join(lines)
    # and nothing from before the trials is printed once they are on screen
    assert not any(s in line for line in lines for s in ("bootstrapping", "proposing", "scoring"))
