"""/v1/embeddings parameters: `dimensions`, `encoding_format`, input element types and `user`
are checked before anything is spent or recorded; base64 is served as OpenAI serves it (the
vector as little-endian float32) for every kind of provider; a route that cannot embed is a
400 that says so."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from rswitch.server import create_app
from tests.fakes import anthropic_fake, ollama_fake, openai_fake
from tests.fakes.server import Fault, fake_embedding

MOCK = {
    "model_providers": {
        "mock": {"type": "mock", "models": ["mock-embed"]},
        "enc": {"type": "encoder", "models": ["wordllama-256"]},
    },
    "gateway": {"embeddings": {"provider": "mock", "model": "mock-embed"}},
}


def decoded(b64: str) -> list[float]:
    """What OpenAI's SDK does with a base64 embedding."""
    return np.frombuffer(base64.b64decode(b64), dtype="<f4").tolist()


def as_float32(vec: list[float]) -> list[float]:
    return np.asarray(vec, dtype=np.float32).tolist()


async def embeddings(gw, **body):
    return await gw.client.post("/v1/embeddings", json=body)


@pytest.mark.parametrize(
    ("dimensions", "shown"),
    [(-1, "-1"), (0, "0"), ("8", "a string"), (8.5, "8.5"), (True, "a boolean"), ([8], "an array")],
)
async def test_dimensions_that_are_not_a_positive_integer_are_400(make_gateway, dimensions, shown):
    gw = await make_gateway(MOCK)
    r = await embeddings(gw, model="mock-embed", input="refund my order", dimensions=dimensions)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "dimensions"
    assert err["message"] == f"'dimensions' must be a positive integer; got {shown}"
    assert gw.analytics_rows() == []  # refused before the provider: nothing spent, nothing recorded


@pytest.mark.parametrize(("model", "native"), [("mock-embed", 64), ("wordllama-256", 256)])
async def test_more_dimensions_than_the_model_has_is_400_naming_it(make_gateway, model, native):
    gw = await make_gateway(MOCK)
    r = await embeddings(gw, model=model, input="refund my order", dimensions=100000)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"model '{model}'" in message and f"has {native} dimensions" in message
    assert gw.analytics_rows() == []
    r = await embeddings(gw, model=model, input="refund my order", dimensions=native)
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == native


async def test_dimensions_go_to_an_upstream_that_does_not_say_its_size(make_gateway):
    with openai_fake.running() as oa:
        gw = await make_gateway(
            {"model_providers": {"oa": {"type": "openai", "base_url": oa.base_url, "models": ["emb"]}}}
        )
        r = await embeddings(gw, model="emb", input="hello world", dimensions=12)
        assert r.status_code == 200 and r.json()["data"][0]["embedding"] == fake_embedding("hello world", 12)
        assert oa.recorder.last["dimensions"] == 12


@pytest.mark.parametrize("fmt", ["ascii", "", "BASE64", 1, ["base64"]])
async def test_encoding_format_other_than_float_or_base64_is_400(make_gateway, fmt):
    gw = await make_gateway(MOCK)
    r = await embeddings(gw, model="mock-embed", input="x", encoding_format=fmt)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "encoding_format" and 'must be "float" or "base64"' in err["message"]
    assert gw.analytics_rows() == []


@pytest.mark.parametrize("model", ["mock-embed", "wordllama-256"])
async def test_base64_is_little_endian_float32_of_the_float_answer(make_gateway, model):
    gw = await make_gateway(MOCK)
    texts = ["refund my order", "the volcano erupted"]
    floats = (await embeddings(gw, model=model, input=texts, encoding_format="float")).json()["data"]
    r = await embeddings(gw, model=model, input=texts, encoding_format="base64", dimensions=32)
    assert r.status_code == 200, r.text
    b64 = r.json()["data"]
    assert [d["index"] for d in b64] == [0, 1] and all(isinstance(d["embedding"], str) for d in b64)
    assert all(len(base64.b64decode(d["embedding"])) == 32 * 4 for d in b64)  # 32 float32s
    full = (await embeddings(gw, model=model, input=texts, encoding_format="base64")).json()["data"]
    assert [decoded(d["embedding"]) for d in full] == [as_float32(d["embedding"]) for d in floats]


async def test_base64_from_upstreams_that_answer_floats(make_gateway):
    with openai_fake.running() as oa, ollama_fake.running() as ol:
        gw = await make_gateway(
            {
                "model_providers": {
                    "oa": {"type": "openai", "base_url": oa.base_url, "models": ["text-embedding-3-small"]},
                    "ol": {"type": "ollama", "base_url": ol.base_url, "models": ["nomic-embed-text"]},
                }
            }
        )
        for model, upstream, dims in (("text-embedding-3-small", oa, 8), ("nomic-embed-text", ol, 8)):
            r = await embeddings(gw, model=model, input=["hello world"], encoding_format="base64")
            assert r.status_code == 200, r.text
            assert decoded(r.json()["data"][0]["embedding"]) == as_float32(
                fake_embedding("hello world", dims)
            )
            assert "encoding_format" not in upstream.recorder.last  # asked for floats, encoded here


async def test_openai_sdk_default_base64_decodes_to_the_float_vectors(make_gateway):
    """The SDK asks for base64 unless told otherwise and decodes it; raw floats would slip
    through unnoticed, so the wire is checked too."""
    gw = await make_gateway(MOCK)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw.core, manage_lifecycle=False)))
    client = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="x", http_client=http, max_retries=0)
    async with http:
        raw = await client.embeddings.with_raw_response.create(model="mock-embed", input=["one two", "three"])
        wire = raw.http_response.json()["data"]
        assert all(isinstance(d["embedding"], str) for d in wire)
        res = raw.parse()
        floats = await client.embeddings.create(
            model="mock-embed", input=["one two", "three"], encoding_format="float"
        )
        assert [d.embedding for d in res.data] == [as_float32(d.embedding) for d in floats.data]
        asked = await client.embeddings.create(model="mock-embed", input="three", encoding_format="base64")
        assert isinstance(asked.data[0].embedding, str)  # asked for explicitly: the SDK leaves it encoded
        assert decoded(asked.data[0].embedding) == res.data[1].embedding


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        (["refund", 1], "input[1] is a number in an array of strings"),
        (["refund", ""], "input[1] is an empty string in an array of strings"),
        (["refund", None], "input[1] is null in an array of strings"),
        (["refund", [1, 2]], "input[1] is an array in an array of strings"),
        ([[1, 2], "refund"], "input[1] is a string, not a token array"),
        ([[1, -2]], "input[0] is an array, not a token array"),
        ([[1, True]], "input[0] is an array, not a token array"),
        ([[1.5]], "input[0] is an array, not a token array"),
        ([{"text": "x"}], "input[0] is an object, not a token array"),
        ({"text": "x"}, "got an object"),
        (["x"] * 2049, "'input' has 2049 items; at most 2048"),
    ],
)
async def test_input_elements_of_the_wrong_type_are_400_naming_the_element(make_gateway, inputs, fragment):
    gw = await make_gateway(MOCK)
    r = await embeddings(gw, model="mock-embed", input=inputs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input" and fragment in err["message"]
    assert gw.analytics_rows() == []


@pytest.mark.parametrize("metadata", [[], "", 0, ["combination_id"]])
async def test_metadata_must_be_an_object(make_gateway, metadata):
    gw = await make_gateway(MOCK)
    r = await embeddings(gw, model="mock-embed", input="x", metadata=metadata)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


@pytest.mark.parametrize("user", [5, {"id": "u"}, ["u"], True])
async def test_user_must_be_a_string(make_gateway, user):
    gw = await make_gateway(MOCK)
    r = await embeddings(gw, model="mock-embed", input="x", user=user)
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    assert (await embeddings(gw, model="mock-embed", input="x", user="user-1")).status_code == 200


async def test_a_body_nested_too_deep_to_forward_is_400(make_gateway):
    gw = await make_gateway(MOCK)
    deep: list = []
    for _ in range(300):
        deep = [deep]
    r = await gw.client.post(
        "/v1/embeddings",
        content=b'{"model":"mock-embed","input":"x","extra":' + str(deep).encode() + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert (await embeddings(gw, model="mock-embed", input="x")).status_code == 200  # still serving


CHAT_ONLY = {
    "templates": {"support": {"template": "You support {product}."}},
    "gateway": {
        "combinations": [
            {"id": "claude-support", "template_id": "support", "model": "claude-x", "provider": "claude"},
            {"id": "gpt-support", "template_id": "support", "model": "gpt-4o-mini", "provider": "oa"},
        ]
    },
}


async def test_a_combination_on_a_provider_that_cannot_embed_is_400_before_any_call(make_gateway):
    with anthropic_fake.running() as claude:
        gw = await make_gateway(
            {
                **CHAT_ONLY,
                "model_providers": {
                    "claude": {
                        "type": "anthropic",
                        "base_url": claude.base_url,
                        "api_key_env": "NO_SUCH_KEY",
                    },
                    "oa": {"type": "mock"},
                },
            }
        )
        for body in (
            {"model": "claude-support", "input": "x"},
            {"model": "x", "input": "x", "metadata": {"combination_id": "claude-support"}},
        ):
            r = await gw.client.post("/v1/embeddings", json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "embeddings_not_supported" and err["param"] == "model"
            assert err["message"].startswith("'claude-support' cannot embed: provider 'claude' (anthropic)")
        assert claude.recorder.requests == []  # no upstream was asked, chat endpoint or any other
        assert gw.analytics_rows() == []


async def test_an_upstream_refusing_rswitchs_credentials_is_502_not_the_clients_401(make_gateway):
    with openai_fake.running(models=["text-embedding-3-small"], require_key="sk-local") as oa:
        gw = await make_gateway(
            {
                **CHAT_ONLY,
                "model_providers": {
                    "claude": {"type": "mock"},
                    "oa": {
                        "type": "openai",
                        "base_url": oa.base_url,
                        "api_key_env": "RSWITCH_TEST_LOCAL_KEY",
                    },
                },
            }
        )
        r = await embeddings(gw, model="gpt-support", input="x")
        # the gateway holds no key for it: the upstream's 401 is rswitch's problem, not the client's
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_auth_failed"
        assert oa.recorder.headers[-1].get("authorization") is None
        assert all(body.get("input") == "x" for body in oa.recorder.requests)  # the embeddings endpoint only


async def test_an_openai_compatible_chat_model_is_a_400_that_names_the_combination(make_gateway, monkeypatch):
    monkeypatch.setenv("RSWITCH_TEST_LOCAL_KEY", "sk-local")
    with openai_fake.running(models=["text-embedding-3-small"], require_key="sk-local") as oa:
        gw = await make_gateway(
            {
                **CHAT_ONLY,
                "model_providers": {
                    "claude": {"type": "mock"},
                    "oa": {
                        "type": "openai",
                        "base_url": oa.base_url,
                        "api_key_env": "RSWITCH_TEST_LOCAL_KEY",
                        "models": ["text-embedding-3-small"],
                    },
                },
            }
        )
        r = await embeddings(gw, model="gpt-support", input="x")
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "embeddings_not_supported"
        assert err["message"].startswith("'gpt-support' cannot embed:") and "gpt-4o-mini" in err["message"]
        assert [b.get("messages") for b in oa.recorder.requests] == [None]  # the embeddings endpoint, once
        assert [(x["kind"], x["success"]) for x in gw.analytics_rows()] == [("embedding", False)]
        oa.faults.push(Fault("status", status=503))
        r = await embeddings(gw, model="text-embedding-3-small", input="x")
        assert r.status_code == 503  # upstream trouble stays upstream trouble


@pytest.mark.slow
@pytest.mark.parametrize("load", ["startup", "lazy"])  # lazy: the size is known only once loaded
async def test_the_local_model_honours_dimensions_and_base64(make_gateway, load):
    gw = await make_gateway(
        {
            "model_providers": {"local": {"type": "local", "local": {"n_ctx": 512, "load": load}}},
            "gateway": {"embeddings": {"provider": "local", "model": "smollm2"}},
        }
    )
    r = await embeddings(gw, model="smollm2", input="refund my order", dimensions=1000)
    assert r.status_code == 400 and "576" in r.json()["error"]["message"]  # SmolLM2-135M's size
    texts = ["refund my order", "the volcano erupted"]
    floats = (await embeddings(gw, model="smollm2", input=texts, dimensions=64)).json()["data"]
    assert [len(d["embedding"]) for d in floats] == [64, 64]
    assert all(abs(sum(v * v for v in d["embedding"]) - 1.0) < 1e-5 for d in floats)  # re-normalised
    b64 = (await embeddings(gw, model="smollm2", input=texts, dimensions=64, encoding_format="base64")).json()
    assert [decoded(d["embedding"]) for d in b64["data"]] == [as_float32(d["embedding"]) for d in floats]


@pytest.mark.parametrize(
    ("upstream", "status", "message"),
    [
        ("oa", 400, "The model does not support Embeddings API"),  # as vLLM answers
        ("ol", 500, "this model does not support embeddings"),  # as Ollama answers a chat-only model
    ],
)
async def test_an_upstream_saying_the_model_does_not_embed_is_a_400(make_gateway, upstream, status, message):
    with openai_fake.running() as oa, ollama_fake.running() as ol:
        gw = await make_gateway(
            {
                "templates": {"support": {"template": "You support {product}."}},
                "model_providers": {
                    "oa": {"type": "openai", "base_url": oa.base_url},
                    "ol": {"type": "ollama", "base_url": ol.base_url},
                },
                "gateway": {
                    "combinations": [
                        {"id": "chat", "template_id": "support", "model": "llama3.2", "provider": upstream}
                    ]
                },
            }
        )
        fake = oa if upstream == "oa" else ol
        fake.faults.push(Fault("status", status=status, message=message))
        r = await embeddings(gw, model="chat", input="x")
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "embeddings_not_supported" and err["message"].startswith("'chat' cannot embed:")
        assert message in err["message"]
        assert [b.get("input") for b in fake.recorder.requests] == ["x"]  # its embeddings endpoint, once


@pytest.mark.parametrize(
    ("embedding", "fmt"), [(["a", "b"], "base64"), ("not base64!", "float"), ([[1.0]], "base64")]
)
async def test_an_upstream_answering_a_vector_that_is_not_numbers_is_502(make_gateway, embedding, fmt):
    from aiohttp import web

    from tests.fakes.server import serve_app

    async def answer(request: web.Request) -> web.Response:
        data = [{"object": "embedding", "index": 0, "embedding": embedding}]
        return web.json_response({"object": "list", "data": data, "model": "emb", "usage": {}})

    upstream = web.Application()
    upstream.router.add_post("/v1/embeddings", answer)
    with serve_app(upstream) as root:
        gw = await make_gateway(
            {"model_providers": {"odd": {"type": "openai", "base_url": root + "/v1", "models": ["emb"]}}}
        )
        r = await embeddings(gw, model="emb", input="x", encoding_format=fmt)
    assert r.status_code == 502, r.text
    assert (
        r.json()["error"]["message"] == "provider 'odd' answered an embedding that is not a vector of numbers"
    )
    assert [x["success"] for x in gw.analytics_rows()] == [False]
