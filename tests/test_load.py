"""`rswitch load` against a real gateway process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_real_server import rswitch_serve

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parent.parent / "sample_prompts"

CONFIG = {
    "model_providers": {
        "m": {"type": "mock"},
        "bad": {"type": "mock", "mock": {"failure_rate": 1.0, "failure_status": 400}},
    },
    "template_dirs": [],
    "gateway": {
        "combinations": [
            {"id": "sum", "template_id": "summarise", "model": "m", "provider": "m"},
            {"id": "cls", "template_id": "classify-intent", "model": "m", "provider": "m"},
            {"id": "broken", "prompt": "Broken {x}", "model": "m", "provider": "bad"},
        ]
    },
}


def run_load(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rswitch", "load", *args], capture_output=True, text=True, timeout=120
    )


def test_load_replays_samples_and_summarises(tmp_path):
    config = {**CONFIG, "template_dirs": [str(SAMPLES)]}
    with rswitch_serve(config, tmp_path) as (url, _):
        out = run_load(
            "--url", url, "--requests", "40", "--concurrency", "4", "--template", "classify-intent", "--json"
        )
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["requests"] == 40 and s["succeeded"] == 40 and s["errors"] == {}
        assert s["by_combination"] == {"cls": 40}
        assert s["tokens"]["prompt"] > 0 and s["latency_ms"]["p50"] > 0 and s["throughput_rps"] > 0

        out = run_load(
            "--url", url, "--rate", "40", "--requests", "12", "--stream", "--template", "summarise", "--json"
        )
        s = json.loads(out.stdout)
        assert s["requests"] == 12 and s["succeeded"] == 12 and s["tokens"]["completion"] > 0


def test_load_counts_errors_by_type_from_a_jsonl_file(tmp_path):
    lines = [
        {"model": "broken", "variables": {"x": 1}, "messages": [{"role": "user", "content": "a"}]},
        {"model": "sum", "messages": [{"role": "user", "content": "no variables given"}]},
    ]
    path = tmp_path / "reqs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    with rswitch_serve(
        {
            **CONFIG,
            "templates": {"summarise": {"template": "Sum {words}"}, "classify-intent": {"template": "C"}},
        },
        tmp_path,
    ) as (url, _):
        out = run_load("--url", url, "--file", str(path), "--requests", "6", "--concurrency", "1", "--json")
        s = json.loads(out.stdout)
        assert s["requests"] == 6 and s["succeeded"] == 0
        assert s["errors"] == {"HTTP 400 upstream_error": 3, "HTTP 400 missing_variables": 3}


def test_load_reports_bad_input_clearly(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\n')
    out = run_load("--file", str(bad))
    assert out.returncode != 0 and "bad.jsonl:1: not valid JSON" in out.stderr
    out = run_load("--url", "http://127.0.0.1:9", "-n", "2")
    assert out.returncode != 0 and "cannot reach the gateway" in out.stderr
    out = run_load("--rate", "5", "--concurrency", "2")
    assert out.returncode != 0 and "not both" in out.stderr


def test_load_without_template_replays_only_what_the_gateway_serves(tmp_path):
    # the gateway knows every sample template (template_dirs) but has combinations for two only
    config = {**CONFIG, "template_dirs": [str(SAMPLES)]}
    config["gateway"] = {"combinations": CONFIG["gateway"]["combinations"][:2]}
    with rswitch_serve(config, tmp_path) as (url, _):
        out = run_load("--url", url, "--requests", "60", "--concurrency", "4", "--json")
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        assert s["requests"] == 60 and s["succeeded"] == 60 and s["errors"] == {}
        assert set(s["by_combination"]) == {"sum", "cls"}
        assert s["skipped_templates"] == ["extract-bench", "extract-json", "intent-bench", "support-reply"]
        assert "does not serve: extract-bench, extract-json, intent-bench, support-reply" in out.stderr

        out = run_load("--url", url, "--requests", "4")  # the human summary says it too
        assert out.returncode == 0
        assert "skipped    extract-bench, extract-json, intent-bench, support-reply" in out.stdout


def test_load_refuses_when_the_gateway_serves_no_sample_template(tmp_path):
    config = {**CONFIG, "gateway": {"combinations": [CONFIG["gateway"]["combinations"][2]]}}
    with rswitch_serve(config, tmp_path) as (url, _):
        out = run_load("--url", url, "--requests", "4")
        assert out.returncode != 0
        assert "serves none of the sample templates" in out.stderr and "--file" in out.stderr
