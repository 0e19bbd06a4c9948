"""A deterministic provider for tests, demos and benchmarks: no network, configurable
latency, failure rate and streaming."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator
from typing import Any

from rswitch.providers.base import ChatCall, EmbedCall, Provider, UpstreamError, new_completion_id, now

EMBED_DIMENSIONS = 64  # the mock's vectors; `dimensions` asks for fewer


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
            return str(c or "")
    return ""


def _count(text: str) -> int:
    return max(1, len(text.split()))


class MockProvider(Provider):
    type = "mock"

    def __init__(self, name: str, settings: Any, api_key: str | None) -> None:
        super().__init__(name, settings, api_key)
        self.mock = settings.mock
        self._rng = random.Random(self.mock.seed)

    def _answer(self, call: ChatCall) -> tuple[str, dict[str, int]]:
        text = (
            self.mock.response
            if self.mock.response is not None
            else f"mock answer to: {_last_user_text(call.messages)}"
        )
        prompt_tokens = sum(_count(str(m.get("content", ""))) for m in call.messages)
        completion_tokens = _count(text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return text, usage

    async def _before(self) -> None:
        if self.mock.latency_ms:
            await asyncio.sleep(self.mock.latency_ms / 1000)
        if self.mock.failure_rate and self._rng.random() < self.mock.failure_rate:
            raise UpstreamError(
                self.mock.failure_status, f"provider '{self.name}': mock failure", error_type="upstream_error"
            )

    async def complete(self, call: ChatCall) -> dict[str, Any]:
        await self._before()
        text, usage = self._answer(call)
        return {
            "id": new_completion_id(),
            "object": "chat.completion",
            "created": now(),
            "model": call.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        await self._before()
        text, usage = self._answer(call)
        cid, created = new_completion_id(), now()

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": call.model,
                "choices": choices,
                **extra,
            }

        n = self.mock.stream_chunks
        size = max(1, -(-len(text) // n))
        yield chunk({"role": "assistant", "content": ""})
        for i in range(0, len(text), size):
            if self.mock.chunk_delay_ms:
                await asyncio.sleep(self.mock.chunk_delay_ms / 1000)
            yield chunk({"content": text[i : i + size]})
        yield chunk({}, "stop")
        yield chunk(None, usage=usage)

    def embedding_dimensions(self, model: str) -> int | None:
        return EMBED_DIMENSIONS

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        """A hashed bag of words: deterministic, and texts sharing words land close together."""
        dims = call.params.get("dimensions") or EMBED_DIMENSIONS
        if not isinstance(dims, int) or not 0 < dims <= EMBED_DIMENSIONS:
            raise UpstreamError(
                400,
                f"provider '{self.name}': 'dimensions' must be 1 to {EMBED_DIMENSIONS}",
                error_type="invalid_request_error",
                retryable=False,
            )
        await self._before()
        inputs = [call.inputs] if isinstance(call.inputs, str) else list(call.inputs)
        data, tokens = [], 0
        for i, text in enumerate(inputs):
            words = str(text).lower().split()
            tokens += len(words)
            vec = [0.0] * dims
            for w in words:
                h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
                vec[h % dims] += 1.0 if (h >> 32) & 1 else -1.0
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [v / norm for v in vec]})
        return {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
