"""`rswitch serve` as a real process on loopback, in front of protocol-faithful upstreams,
with the official `openai` SDK as the app."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import orjson
import pytest
import yaml
from aiohttp import web

from tests.fakes import anthropic_fake, ollama_fake, openai_fake
from tests.fakes.server import Fault, serve_app

pytestmark = pytest.mark.slow

SUPPORT = {"product": "Acme", "tone": "kind"}


@contextmanager
def rswitch_serve(config: dict[str, Any], workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `rswitch serve` on a free port; yield (base URL, process); stop it with SIGTERM."""
    path = workdir / "config.yaml"
    config = {
        **config,
        "dataset": {"base_path": str(workdir / "prompts")},
        "analytics": {"path": str(workdir / "analytics.duckdb")},
    }
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rswitch",
            "serve",
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
    if url is None:
        proc.kill()
        raise RuntimeError("rswitch serve did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))
    drain = threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True)
    drain.start()
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        drain.join(5)
        proc.output = "".join(lines)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("serve")
    with (
        openai_fake.running(require_key="sk-up-secret") as up,
        openai_fake.running() as backup,
        anthropic_fake.running() as claude,
        ollama_fake.running() as olla,
    ):
        os.environ["RSWITCH_TEST_UP_KEY"] = "sk-up-secret"
        config = {
            "model_providers": {
                "up": {
                    "type": "openai",
                    "base_url": up.base_url,
                    "api_key_env": "RSWITCH_TEST_UP_KEY",
                    "timeout_seconds": 5,
                },
                "backup": {"type": "openai", "base_url": backup.base_url, "timeout_seconds": 5},
                "claude": {
                    "type": "anthropic",
                    "base_url": claude.base_url,
                    "api_key_env": "RSWITCH_TEST_UP_KEY",
                    "timeout_seconds": 5,
                },
                "olla": {"type": "ollama", "base_url": olla.base_url, "timeout_seconds": 5},
            },
            "templates": {
                "support": {"template": "You support {product}. Be {tone}."},
                "wrr": {"template": "Weighted."},
            },
            "gateway": {
                "combinations": [
                    {
                        "id": "oa",
                        "template_id": "support",
                        "model": "gpt-4o",
                        "provider": "up",
                        "fallbacks": ["oa-backup"],
                    },
                    {
                        "id": "oa-backup",
                        "template_id": "support",
                        "model": "gpt-4o-mini",
                        "provider": "backup",
                        "weight": 0,
                    },
                    {
                        "id": "cl",
                        "template_id": "support",
                        "model": "claude-sonnet-4",
                        "provider": "claude",
                        "weight": 0,
                    },
                    {
                        "id": "ol",
                        "template_id": "support",
                        "model": "llama3.2",
                        "provider": "olla",
                        "weight": 0,
                    },
                    {"id": "w3", "template_id": "wrr", "model": "gpt-4o", "provider": "backup", "weight": 3},
                    {
                        "id": "w1",
                        "template_id": "wrr",
                        "model": "gpt-4o-mini",
                        "provider": "backup",
                        "weight": 1,
                    },
                ]
            },
        }
        with rswitch_serve(config, workdir) as (url, proc):
            yield {
                "url": url,
                "proc": proc,
                "up": up,
                "backup": backup,
                "claude": claude,
                "olla": olla,
                "workdir": workdir,
            }


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="client-key-not-used", max_retries=0)


def aclient(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack["url"] + "/v1", api_key="client-key-not-used", max_retries=0)


CLIENT_MESSAGES = [
    {"role": "system", "content": "Client rules."},
    {"role": "user", "content": "Where is my parcel?"},
    {"role": "assistant", "content": "Which order?"},
    {"role": "user", "content": "Order 42"},
]


def test_sync_sdk_non_streaming_renders_prompt_before_client_messages(stack):
    raw = client(stack).chat.completions.with_raw_response.create(
        model="oa", messages=CLIENT_MESSAGES, temperature=0.1, extra_body={"variables": SUPPORT}
    )
    completion = raw.parse()
    assert raw.headers["x-rswitch-combination"] == "oa" and raw.headers["x-rswitch-provider"] == "up"
    assert completion.choices[0].message.content == "echo: Order 42"
    assert completion.model == "gpt-4o"
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
        > 0
    )
    sent = stack["up"].recorder.last
    assert sent["messages"] == [{"role": "system", "content": "You support Acme. Be kind."}, *CLIENT_MESSAGES]
    assert sent["temperature"] == 0.1 and sent["model"] == "gpt-4o"
    assert "variables" not in sent
    assert stack["up"].recorder.headers[-1]["authorization"] == "Bearer sk-up-secret"


def test_sync_sdk_streaming_usage_arrives_in_last_chunk(stack):
    chunks = list(
        client(stack).chat.completions.create(
            model="oa",
            messages=[{"role": "user", "content": "stream this please"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"variables": SUPPORT},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream this please"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_sync_sdk_streaming_without_include_usage_still_reports_usage_last(stack):
    chunks = list(
        client(stack).chat.completions.create(
            model="oa",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"variables": SUPPORT},
        )
    )
    assert all(c.choices for c in chunks)  # no usage-only chunk the app did not ask for
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens > 0


@pytest.mark.parametrize(("combo", "upstream"), [("cl", "claude"), ("ol", "olla"), ("oa", "up")])
async def test_async_sdk_streaming_and_not_across_providers(stack, combo, upstream):
    c = aclient(stack)
    try:
        done = await c.chat.completions.create(
            model="gpt-whatever",
            messages=[{"role": "user", "content": "hello async"}],
            extra_body={"variables": SUPPORT, "metadata": {"combination_id": combo}},
        )
        assert done.choices[0].message.content == "echo: hello async"
        assert done.usage.prompt_tokens > 0
        stream = await c.chat.completions.create(
            model="gpt-whatever",
            messages=[{"role": "user", "content": "hello stream"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"variables": SUPPORT, "metadata": {"combination_id": combo}},
        )
        chunks = [ch async for ch in stream]
        assert (
            "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "echo: hello stream"
        )
        assert chunks[-1].usage.total_tokens > 0
    finally:
        await c.close()
    sent = stack[upstream].recorder.last
    system = sent.get("system") or sent["messages"][0]["content"]
    assert "You support Acme. Be kind." in str(system)


@pytest.mark.parametrize("fault", [Fault("status", status=500), Fault("status", status=503), Fault("reset")])
def test_failing_upstream_is_served_by_the_fallback(stack, fault):
    stack["up"].faults.push(fault, fault)  # once is retried on the same combination; twice goes on
    raw = client(stack).chat.completions.with_raw_response.create(
        model="oa", messages=[{"role": "user", "content": "rescue me"}], extra_body={"variables": SUPPORT}
    )
    assert raw.headers["x-rswitch-combination"] == "oa-backup"
    assert raw.parse().choices[0].message.content == "echo: rescue me"


def test_failing_upstream_before_first_byte_fails_over_in_a_stream(stack):
    stack["up"].faults.push(Fault("status", status=503), Fault("status", status=503))
    with client(stack).chat.completions.with_streaming_response.create(
        model="oa",
        messages=[{"role": "user", "content": "streamed rescue"}],
        stream=True,
        extra_body={"variables": SUPPORT},
    ) as resp:
        assert resp.headers["x-rswitch-combination"] == "oa-backup"
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text == "echo: streamed rescue"


@pytest.mark.parametrize("fault", [Fault("cut", after=2), Fault("error_event", after=2)])
def test_a_stream_broken_mid_answer_is_finished_by_the_fallback(stack, fault):
    stack["up"].faults.push(fault)
    got = []
    finishes = []
    for chunk in client(stack).chat.completions.create(
        model="oa",
        messages=[{"role": "user", "content": "a b c d e f g"}],
        stream=True,
        extra_body={"variables": SUPPORT},
    ):
        got.extend(ch.delta.content or "" for ch in chunk.choices)
        finishes.extend(ch.finish_reason for ch in chunk.choices if ch.finish_reason)
    assert "".join(got) == "echo: a b c d e f g" and finishes == ["stop"]


def test_weighted_round_robin_over_100_requests_splits_exactly(stack):
    c = client(stack)
    picks = Counter()
    for i in range(100):
        raw = c.chat.completions.with_raw_response.create(
            model="wrr", messages=[{"role": "user", "content": f"q{i}"}]
        )
        picks[raw.headers["x-rswitch-combination"]] += 1
    assert picks == {"w3": 75, "w1": 25}


def test_bad_input_through_the_sdk(stack):
    c = client(stack)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="oa", messages=[{"role": "user", "content": "x"}])
    assert "missing variable(s): product, tone" in exc.value.message
    with pytest.raises(openai.BadRequestError, match="unknown combination id 'ghost'"):
        c.chat.completions.create(
            model="oa",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"metadata": {"combination_id": "ghost"}},
        )
    r = httpx.post(
        stack["url"] + "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.get(stack["url"] + "/health").json() == {"status": "healthy"}
    status = httpx.get(stack["url"] + "/status").text
    assert "sk-up-secret" not in status


def gated_upstream(gate: threading.Event):
    """An OpenAI-compatible upstream that streams one chunk, then waits for `gate`."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
            data = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + orjson.dumps(data) + b"\n\n"

        await resp.write(chunk({"role": "assistant", "content": "first "}))
        await asyncio.to_thread(gate.wait, 30)
        await resp.write(chunk({"content": "second"}))
        await resp.write(chunk({}, "stop"))
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        await resp.write(
            b"data: "
            + orjson.dumps(
                {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": body["model"],
                    "choices": [],
                    "usage": usage,
                }
            )
            + b"\n\n"
        )
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return app


def test_stream_is_real_pass_through_first_byte_not_held_back(tmp_path):
    gate = threading.Event()
    with serve_app(gated_upstream(gate)) as root:
        config = {
            "model_providers": {"g": {"type": "openai", "base_url": root + "/v1"}},
            "gateway": {"combinations": [{"id": "g", "prompt": "Be brief.", "model": "m", "provider": "g"}]},
        }
        with rswitch_serve(config, tmp_path) as (url, _):
            stream = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                model="g", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            it = iter(stream)
            first = next(it)
            # the upstream is still blocked on the gate: this chunk came through as it arrived
            assert not gate.is_set()
            assert first.choices[0].delta.content == "first "
            gate.set()
            rest = list(it)
            assert "".join(c.choices[0].delta.content or "" for c in rest) == "second"
            assert rest[-1].usage.total_tokens == 5


def test_sigterm_drains_every_answered_call_into_sqlite_and_duckdb(tmp_path):
    config = {
        "model_providers": {"m": {"type": "mock"}},
        "templates": {"t": {"template": "T {x}"}},
        "gateway": {"combinations": [{"id": "c", "template_id": "t", "model": "m", "provider": "m"}]},
        # a slow flush interval, so records are still queued when the signal arrives
        "recorder": {"flush_interval_ms": 5000, "batch_size": 100000},
    }
    answered = 0
    with rswitch_serve(config, tmp_path) as (url, proc):
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for i in range(30):
            c.chat.completions.create(
                model="c", messages=[{"role": "user", "content": f"n{i}"}], extra_body={"variables": {"x": i}}
            )
            answered += 1
        for _ in c.chat.completions.create(
            model="c",
            messages=[{"role": "user", "content": "s"}],
            stream=True,
            extra_body={"variables": {"x": 1}},
        ):
            pass
        answered += 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "31 record(s) written, 0 dropped" in proc.output  # type: ignore[attr-defined]
    conn = sqlite3.connect(tmp_path / "prompts" / "t" / "dataset.sqlite")
    assert conn.execute("SELECT count(*) FROM examples WHERE success = 1").fetchone()[0] == answered
    conn.close()
    db = duckdb.connect(str(tmp_path / "analytics.duckdb"), read_only=True)
    assert db.execute("SELECT count(*) FROM invocations WHERE success").fetchone()[0] == answered
    db.close()


def test_client_leaving_mid_stream_is_recorded_and_the_upstream_released(tmp_path):
    gate = threading.Event()
    with serve_app(gated_upstream(gate)) as root:
        config = {
            "model_providers": {"g": {"type": "openai", "base_url": root + "/v1"}},
            "gateway": {"combinations": [{"id": "g", "prompt": "Be brief.", "model": "m", "provider": "g"}]},
        }
        with rswitch_serve(config, tmp_path) as (url, _):
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                json={"model": "g", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            ) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ")
            # the client is gone while the upstream is still silent: the gateway must notice,
            # stop waiting on the upstream and record the call as a failure
            deadline = time.monotonic() + 20
            stats = {}
            while time.monotonic() < deadline:
                stats = httpx.get(url + "/v1/prompts/g/stats").json()
                if stats["total_requests"]:
                    break
                time.sleep(0.05)
            gate.set()
            assert stats["total_requests"] == 1 and stats["error_count"] == 1
            assert httpx.get(url + "/health").status_code == 200


def test_serve_output_has_no_per_call_library_lines(tmp_path):
    """The Ollama and Anthropic SDKs call through httpx, which logs an INFO line per request."""
    with ollama_fake.running() as olla, anthropic_fake.running() as claude:
        os.environ["RSWITCH_TEST_UP_KEY"] = "sk-up-secret"
        config = {
            "model_providers": {
                "olla": {"type": "ollama", "base_url": olla.base_url},
                "claude": {
                    "type": "anthropic",
                    "base_url": claude.base_url,
                    "api_key_env": "RSWITCH_TEST_UP_KEY",
                },
            },
            "gateway": {
                "combinations": [
                    {"id": "ol", "prompt": "Be brief.", "model": "llama3.2", "provider": "olla"},
                    {"id": "cl", "prompt": "Be brief.", "model": "claude-x", "provider": "claude"},
                ]
            },
        }
        with rswitch_serve(config, tmp_path) as (url, proc):
            sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            for model in ("ol", "cl"):
                sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert len(olla.recorder.requests) == 1 and len(claude.recorder.requests) == 1
    assert "HTTP Request" not in proc.output and "httpx" not in proc.output, proc.output
