"""A stream broken on a remote upstream is finished by the embedded model (real SmolLM2 through
llama.cpp), which continues the partial answer as an assistant prefill."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SUPPORT_VARS, chat
from tests.fakes import openai_fake
from tests.fakes.server import Fault
from tests.test_streaming import events, joined

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("json_mode", [False, True])
async def test_the_local_model_continues_a_stream_cut_upstream(make_gateway, json_mode: bool):
    """In JSON mode too: the remote's partial object is finished into one that parses."""
    with openai_fake.running() as up:
        gw = await make_gateway(
            {
                "model_providers": {
                    "remote": {"type": "openai", "base_url": up.base_url, "api_key": "sk-test"},
                    "local": {"type": "local", "local": {"n_ctx": 1024}},
                },
                "gateway": {
                    "combinations": [
                        {
                            "id": "remote",
                            "template_id": "support",
                            "model": "gpt-4o-mini",
                            "provider": "remote",
                            "fallbacks": ["loc"],
                        },
                        {
                            "id": "loc",
                            "template_id": "support",
                            "model": "smollm2",
                            "provider": "local",
                            "weight": 0,
                        },
                    ]
                },
            }
        )
        up.faults.push(Fault("cut", after=3))
        r = await gw.post(
            chat(
                "Name three colours of the rainbow",
                model="remote",
                variables=SUPPORT_VARS,
                stream=True,
                temperature=0,
                max_tokens=256 if json_mode else 24,
                **({"response_format": {"type": "json_object"}} if json_mode else {}),
            )
        )
    evts = events(r.text)
    assert evts[-1] == "[DONE]"  # a whole answer, not an error event
    finishes = [
        c["finish_reason"] for e in evts[:-1] for c in e.get("choices") or () if c.get("finish_reason")
    ]
    assert len(finishes) == 1
    text = joined(evts)
    broken, done = gw.dataset_rows("support")
    sent = broken["output"]  # what the remote streamed before it was cut
    assert sent and text.startswith(sent) and len(text) > len(sent)
    if json_mode:
        assert sent.startswith('{"answer": "echo:') and isinstance(json.loads(text), dict), text
    assert done["combination_id"] == "loc" and done["success"] == 1 and done["output"] == text
    assert [a["combination"] for a in json.loads(done["attempts"])] == ["remote", "loc"]
    assert evts[-2]["rswitch"]["continued"] is True
    assert evts[-2]["usage"]["completion_tokens"] > done["completion_tokens"]  # both attempts counted
