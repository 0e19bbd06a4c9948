"""In-process encoders (`type: encoder`): the static default and the ONNX backend, served on
/v1/embeddings and used by the semantic router."""

from __future__ import annotations

import numpy as np
import pytest

from rswitch.config import ConfigError, ProviderConfig, parse_config
from rswitch.providers import build_provider
from rswitch.providers.encoder import EncoderError, OnnxEncoder
from tests.conftest import chat
from tests.test_router_rules import COMBOS

ENCODER = {"model_providers": {"enc": {"type": "encoder", "models": ["wordllama-256"]}}}


def cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_static_encoder_serves_embeddings_that_place_paraphrases_closer(make_gateway):
    gw = await make_gateway(ENCODER)
    texts = ["I want a refund for my order", "please give me my money back", "will it rain in paris tomorrow"]
    r = await gw.client.post("/v1/embeddings", json={"model": "wordllama-256", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    vecs = [d["embedding"] for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and len(vecs[0]) == 256
    assert body["usage"]["prompt_tokens"] > 0
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.1
    # Matryoshka truncation: fewer dimensions, still unit length
    r = await gw.client.post(
        "/v1/embeddings", json={"model": "wordllama-256", "input": "refund", "dimensions": 64}
    )
    v = r.json()["data"][0]["embedding"]
    assert len(v) == 64 and abs(np.linalg.norm(v) - 1) < 1e-4


async def test_encoder_refuses_chat_and_bad_input_clearly(make_gateway):
    gw = await make_gateway(
        ENCODER
        | {
            "gateway": {
                "combinations": [
                    {"id": "enc-chat", "prompt": "x", "model": "wordllama-256", "provider": "enc"}
                ]
            }
        }
    )
    r = await gw.post({"model": "enc-chat", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "serves /v1/embeddings only" in r.json()["error"]["message"]
    r = await gw.client.post("/v1/embeddings", json={"model": "wordllama-256", "input": [[1, 2, 3]]})
    assert r.status_code == 400 and "list of strings" in r.json()["error"]["message"]


async def test_semantic_router_on_the_static_encoder(make_gateway):
    routing = {
        "default": [
            {
                "type": "semantic",
                "name": "topics",
                "encoder": {"provider": "enc", "model": "wordllama-256"},
                "routes": [
                    {
                        "route": "strong",
                        "threshold": 0.4,
                        "utterances": [
                            "review this legal contract clause",
                            "is this contract enforceable in court",
                            "draft a non-disclosure agreement",
                        ],
                    },
                    {
                        "route": "cheap",
                        "threshold": 0.4,
                        "utterances": [
                            "what is the weather today",
                            "will it rain tomorrow",
                            "weather forecast for the weekend",
                        ],
                    },
                ],
            }
        ]
    }
    gw = await make_gateway(ENCODER | {"gateway": {"combinations": COMBOS}, "routing": routing})
    step = gw.core.gateway.default_chain.steps[0]
    assert step.encoder_id.startswith("encoder:static:wordllama")
    vars_ = {"words": 5}
    r = await gw.post(chat("can you check the termination clause of my contract", variables=vars_))
    assert r.headers["x-rswitch-combination"] == "strong", r.headers["x-rswitch-route"]
    r = await gw.post(chat("is it going to rain on saturday", variables=vars_))
    assert r.headers["x-rswitch-combination"] == "cheap", r.headers["x-rswitch-route"]


# -- the onnx backend, on a tiny real ONNX graph ----------------------------------------------


def test_onnx_encoder_mean_pools_over_the_mask_and_normalises(onnx_dir):
    pytest.importorskip("onnxruntime")
    folder, table, vocab = onnx_dir
    enc = OnnxEncoder(str(folder))
    alone = enc.encode(["refund money"])
    batch = enc.encode(["refund money", "will it rain in paris tomorrow please"])
    assert batch.shape == (2, 16) and enc.dim == 16
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)  # padding changes nothing
    expected = (table[vocab["refund"]] + table[vocab["money"]]) / 2
    np.testing.assert_allclose(batch[0], expected / np.linalg.norm(expected), atol=1e-5)
    assert abs(np.linalg.norm(batch[1]) - 1) < 1e-5


async def test_onnx_encoder_provider_end_to_end(make_gateway, onnx_dir):
    pytest.importorskip("onnxruntime")
    folder, _, _ = onnx_dir
    gw = await make_gateway(
        {
            "model_providers": {
                "mini": {
                    "type": "encoder",
                    "models": ["mini"],
                    "encoder": {"backend": "onnx", "path": str(folder)},
                }
            }
        }
    )
    r = await gw.client.post("/v1/embeddings", json={"model": "mini", "input": ["refund my order", "rain"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"][1]["embedding"]) == 16


async def test_onnx_encoder_with_missing_files_fails_with_the_path(tmp_path):
    pc = ProviderConfig(type="encoder", encoder={"backend": "onnx", "path": str(tmp_path)})
    provider = build_provider("mini", pc, None)
    await provider.start()  # does not raise: the problem is reported on use
    with pytest.raises(Exception) as info:
        await provider.encode(["x"])
    assert str(tmp_path / "model.onnx") in str(info.value)
    with pytest.raises(EncoderError, match="needs `path`"):
        _ = build_provider("m", ProviderConfig(type="encoder", encoder={"backend": "onnx"}), None).encoder


def test_encoder_config_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        parse_config({"model_providers": {"e": {"type": "encoder", "encoder": {"backend": "bert"}}}})
    assert "model_providers.e.encoder.backend" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config({"model_providers": {"e": {"type": "encoder", "encoder": {"dims": 64}}}})
    assert "model_providers.e.encoder.dims" in str(info.value)


def test_embedded_default_embeds_with_the_static_encoder():
    from rswitch.defaults import ENCODER_MODEL, default_config

    cfg, _ = default_config(probe_ollama=False)
    assert cfg.gateway.embeddings.model == ENCODER_MODEL
    assert cfg.model_providers[cfg.gateway.embeddings.provider].type == "encoder"
