"""Shared fixtures: a Core built from a config dict in a temp dir, and an in-process client."""

from __future__ import annotations

import copy
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import duckdb
import httpx
import numpy as np
import pytest

from rswitch.config import parse_config
from rswitch.core import Core
from rswitch.server import create_app
from tests.servers import postgres_dsn, redis_url  # noqa: F401  (real servers, for the tests that ask)

BASE_CONFIG: dict[str, Any] = {
    "gateway": {
        "strategy": "weighted_round_robin",
        "combinations": [
            {
                "id": "support-a",
                "template_id": "support",
                "model": "small",
                "provider": "mock",
                "weight": 3,
                "is_primary": True,
                "fallbacks": ["support-b"],
            },
            {"id": "support-b", "template_id": "support", "model": "large", "provider": "mock", "weight": 1},
            {"id": "sum-a", "template_id": "summarise", "model": "small", "provider": "mock"},
        ],
    },
    "templates": {
        "support": {"template": "You support {product}. Be {tone}."},
        "summarise": {"template": "Summarise in {words} words."},
    },
    "model_providers": {"mock": {"type": "mock"}},
}

SUPPORT_VARS = {"product": "Acme", "tone": "kind"}


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def make_config(tmp_path: Path, override: dict[str, Any] | None = None) -> Any:
    data = merge(BASE_CONFIG, override or {})
    data.setdefault("dataset", {})["base_path"] = str(tmp_path / "prompts")
    data.setdefault("analytics", {})["path"] = str(tmp_path / "analytics.duckdb")
    data.setdefault("recorder", {}).setdefault("flush_interval_ms", 20)
    return parse_config(data)


class Gateway:
    """An in-process gateway: `client` talks to the ASGI app, `core` is the runtime behind it."""

    def __init__(self, core: Core, client: httpx.AsyncClient, tmp_path: Path) -> None:
        self.core = core
        self.client = client
        self.tmp_path = tmp_path

    async def post(self, body: Any, **kw: Any) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", json=body, **kw)

    def flush(self) -> None:
        assert self.core.recorder.flush(10)

    def dataset_rows(self, template_id: str) -> list[dict[str, Any]]:
        self.flush()
        path = self.tmp_path / "prompts" / template_id / "dataset.sqlite"
        if not path.exists():
            return []
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM examples ORDER BY id")]
        finally:
            conn.close()

    def analytics_rows(self) -> list[dict[str, Any]]:
        self.flush()
        cur = self.core.analytics._conn.cursor()
        res = cur.execute("SELECT * FROM invocations ORDER BY created_at")
        cols = [d[0] for d in res.description]
        return [dict(zip(cols, r, strict=True)) for r in res.fetchall()]


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Gateway] = []

    async def factory(override: dict[str, Any] | None = None) -> Gateway:
        core = Core(make_config(tmp_path, override))
        await core.start()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(core, manage_lifecycle=False)),
            base_url="http://localhost",  # a loopback name: without keys, other Hosts are refused
        )
        gw = Gateway(core, client, tmp_path)
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        await gw.client.aclose()
        await gw.core.stop()


@pytest.fixture
async def gateway(make_gateway: Callable[..., Any]) -> Gateway:
    return await make_gateway()


@pytest.fixture
async def sdk(make_gateway: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    """`await sdk(config)`: (an in-process gateway, the official `openai` SDK's async client on it)."""
    import openai

    clients: list[Any] = []

    async def make(cfg: dict[str, Any]) -> tuple[Gateway, Any]:
        gw = await make_gateway(cfg)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(gw.core, manage_lifecycle=False)),
            base_url="http://localhost",
        )
        client = openai.AsyncOpenAI(
            base_url="http://localhost/v1", api_key="unused", http_client=http, max_retries=0
        )
        clients.append(client)
        return gw, client

    yield make
    for c in clients:
        await c.close()


def read_duckdb(path: Path) -> list[tuple[Any, ...]]:
    conn = duckdb.connect(str(path), read_only=True)
    try:
        return conn.execute("SELECT combination_id, success, error_type FROM invocations").fetchall()
    finally:
        conn.close()


# -- a tiny real ONNX sentence encoder (the onnx backend's files) ---------------------------

WORDS = "refund money back order rain weather paris tomorrow please my the a".split()


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    """A real ONNX model (an embedding lookup: last_hidden_state = E[input_ids]) with a real
    `tokenizers` word-level tokenizer: the same files a sentence-transformers export has."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("onnx-encoder")
    vocab = {"[PAD]": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    table = np.random.default_rng(7).normal(size=(len(vocab), 16)).astype(np.float32)
    table[0] = 100.0  # padding rows would wreck the mean if the mask were ignored
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
        "lookup",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", 16])],
        initializer=[numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # what any onnxruntime of the last years reads
    onnx.save(model, str(folder / "model.onnx"))
    return folder, table, vocab
