"""The embedded local model: a real GGUF (SmolLM2-135M) through llama.cpp, in-process."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys

import openai
import pytest

from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.providers.local import LocalModelError
from tests.conftest import SUPPORT_VARS, chat
from tests.test_streaming import events, joined

pytestmark = pytest.mark.slow

LOCAL = {
    "model_providers": {
        "local": {"type": "local", "local": {"n_ctx": 1024, "queue_size": 1}},
        "mock": {"type": "mock"},
    },
    "gateway": {
        "embeddings": {"provider": "local", "model": "smollm2"},
        "combinations": [
            {
                "id": "loc",
                "template_id": "support",
                "model": "smollm2",
                "provider": "local",
                "fallbacks": ["spare"],
            },
            {"id": "spare", "template_id": "support", "model": "mock-model", "provider": "mock", "weight": 0},
            {"id": "solo", "template_id": "summarise", "model": "smollm2", "provider": "local"},
        ],
    },
}


async def test_real_answer_with_real_usage(make_gateway):
    gw = await make_gateway(LOCAL)
    r = await gw.post(
        chat(
            "What is the capital of France?",
            model="loc",
            variables=SUPPORT_VARS,
            temperature=0,
            max_tokens=24,
        )
    )
    assert r.status_code == 200, r.text
    body = r.json()
    answer = body["choices"][0]["message"]["content"]
    assert answer.strip() and not answer.startswith("mock")
    assert body["model"] == "smollm2" and r.headers["x-rswitch-provider"] == "local"
    u = body["usage"]
    assert u["prompt_tokens"] > 10 and 0 < u["completion_tokens"] <= 24 and "estimated" not in u


async def test_temperature_zero_and_seed_are_deterministic_and_max_tokens_honoured(make_gateway):
    gw = await make_gateway(LOCAL)
    body = chat(
        "Write a long story about a dragon.",
        model="loc",
        variables=SUPPORT_VARS,
        temperature=0,
        seed=7,
        max_tokens=8,
    )
    a, b = (await gw.post(body)).json(), (await gw.post(body)).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens"] == 8 and a["choices"][0]["finish_reason"] == "length"


async def test_stop_sequence_is_honoured(make_gateway):
    gw = await make_gateway(LOCAL)
    free = (
        await gw.post(
            chat(
                "Count: one, two, three, four, five",
                model="loc",
                variables=SUPPORT_VARS,
                temperature=0,
                max_tokens=30,
            )
        )
    ).json()
    text = free["choices"][0]["message"]["content"]
    assert len(text) > 4
    stop = text[2:4]  # a piece the model is known to produce at this seed and temperature
    cut = (
        await gw.post(
            chat(
                "Count: one, two, three, four, five",
                model="loc",
                variables=SUPPORT_VARS,
                temperature=0,
                max_tokens=30,
                stop=stop,
            )
        )
    ).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)]


async def test_streams_token_by_token_with_usage(make_gateway):
    gw = await make_gateway(LOCAL)
    r = await gw.post(
        chat(
            "Say hello to the world.",
            model="loc",
            variables=SUPPORT_VARS,
            stream=True,
            temperature=0,
            max_tokens=16,
        )
    )
    evts = events(r.text)
    pieces = [
        c["delta"].get("content")
        for e in evts
        if isinstance(e, dict)
        for c in e.get("choices", [])
        if c["delta"].get("content")
    ]
    assert len(pieces) >= 3  # many chunks, not one blob
    assert evts[-1] == "[DONE]"
    usage = evts[-2]["usage"]
    assert usage["completion_tokens"] == len(pieces) and usage["prompt_tokens"] > 10
    [row] = gw.dataset_rows("support")
    assert row["output"] == joined(evts) and row["success"] == 1


async def test_full_queue_answers_503_with_retry_after_and_fallbacks_serve(make_gateway):
    gw = await make_gateway(LOCAL)
    # hold the model: a stream that has produced its first token and is not read further
    session = await gw.core.gateway.open_stream(
        chat("Tell me a long story.", model="solo", variables={"words": 50}, stream=True, max_tokens=200)
    )
    try:
        status = (await gw.client.get("/status")).json()
        local = next(p for p in status["providers"] if p["name"] == "local")
        assert local["queue_depth"] == 1 and local["queue_capacity"] == 1 and local["loaded"] is True
        busy = await gw.post(chat("hi", model="solo", variables={"words": 5}))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "local_queue_full"
        served = await gw.post(chat("hi", model="loc", variables=SUPPORT_VARS))
        assert served.status_code == 200 and served.headers["x-rswitch-combination"] == "spare"
    finally:
        await session.aclose()


async def test_inference_does_not_block_the_event_loop(make_gateway):
    gw = await make_gateway(LOCAL)
    long = asyncio.create_task(
        gw.post(
            chat(
                "Write a long essay about rivers.",
                model="solo",
                variables={"words": 200},
                max_tokens=160,
                temperature=0,
            )
        )
    )
    await asyncio.sleep(0)  # let it start
    health = await gw.client.get("/health")
    assert health.status_code == 200
    assert not long.done()  # the loop answered while the model was still generating
    assert (await long).status_code == 200


async def test_pooled_embeddings_place_similar_texts_closer(make_gateway):
    gw = await make_gateway(LOCAL)
    r = await gw.client.post(
        "/v1/embeddings",
        json={
            "model": "smollm2",
            "input": [
                "I want a refund for my order",
                "Please give me my money back for the purchase",
                "The volcano erupted last night",
            ],
        },
    )
    assert r.status_code == 200, r.text
    vecs = [d["embedding"] for d in r.json()["data"]]
    assert len(vecs) == 3 and len(vecs[0]) == 576  # SmolLM2-135M's hidden size: one pooled vector per input

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    assert r.json()["usage"]["prompt_tokens"] > 10


def test_missing_model_file_is_a_clear_startup_error(tmp_path):
    cfg = parse_config(
        {
            "model_providers": {
                "local": {"type": "local", "local": {"model_path": str(tmp_path / "nope.gguf")}}
            },
            "dataset": {"base_path": str(tmp_path)},
            "analytics": {"path": str(tmp_path / "a.duckdb")},
        }
    )
    with pytest.raises(LocalModelError, match="local model file not found: .*nope.gguf"):
        Core(cfg)


def test_zero_config_serve_answers_with_the_real_model(tmp_path):
    """No --config, no config.yaml, no keys: the built-in default on the embedded model."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "RSWITCH_CONFIG"}
    env["RSWITCH_DATA_DIR"] = str(tmp_path / "data")
    env["OLLAMA_HOST"] = "127.0.0.1:9"  # nothing there: the summary must say so
    proc = subprocess.Popen(
        [sys.executable, "-m", "rswitch", "serve", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        url = None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                url = line.split("listening on ")[1].strip()
            if "press Ctrl+C" in line:
                break
        summary = "".join(lines)
        assert url, summary
        assert "(built-in defaults)" in summary and "not set   OPENAI_API_KEY" in summary
        assert "no answer Ollama at http://127.0.0.1:9" in summary
        assert "SmolLM2-135M-Instruct.Q4_1.gguf (loaded at start)" in summary
        assert str(tmp_path / "data") in summary
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="classify-intent",
            messages=[{"role": "user", "content": "I forgot my password"}],
            extra_body={"variables": {"labels": "billing, login, shipping, other"}},
            max_tokens=10,
            temperature=0,
        )
        assert reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens > 0
        # the bare model name from /v1/models, no template: passed through to the model as sent
        served = [m.id for m in client.models.list().data if getattr(m, "rswitch_kind", None) == "model"]
        assert "smollm2-135m-instruct" in served
        plain = client.chat.completions.with_raw_response.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Say hello"}],
            max_tokens=8,
            temperature=0,
        )
        assert plain.headers["x-rswitch-combination"] == "local/smollm2-135m-instruct"
        assert plain.parse().choices[0].message.content.strip()
    finally:
        proc.terminate()
        proc.wait(30)


async def test_a_call_given_up_on_keeps_its_queue_slot_until_the_model_is_done(make_gateway):
    """A judge's timeout (or a client gone) stops the wait, not llama.cpp: the next call must see
    the worker as busy, or the queue limit would undercount."""
    gw = await make_gateway(LOCAL)
    provider = gw.core.providers["local"]
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def long_inference() -> str:  # stands in for a generation still running on the worker thread
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(30)
        return "done"

    waiter = asyncio.create_task(provider._run(long_inference))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiter), 0.05)
    waiter.cancel()  # the caller gives up, as JudgeStep's timeout does
    with pytest.raises(asyncio.CancelledError):
        await waiter
    busy = await asyncio.wait_for(gw.post(chat("hi", model="solo", variables={"words": 5})), 10)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "local_queue_full"
    release.set()
    for _ in range(200):  # the worker finishes, and only then is the slot free
        if provider.describe()["queue_depth"] == 0:
            break
        await asyncio.sleep(0.01)
    assert provider.describe()["queue_depth"] == 0
    ok = await gw.post(chat("hi", model="solo", variables={"words": 5}, max_tokens=4))
    assert ok.status_code == 200
