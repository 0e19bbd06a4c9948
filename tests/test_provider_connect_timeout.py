"""A host that never takes the connection fails an attempt after the provider's connect timeout,
not after its whole deadline, so a fallback still gets its turn (OpenAI-compatible, Anthropic
and Ollama)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from rswitch.config import ProviderConfig
from rswitch.providers.anthropic import AnthropicProvider
from rswitch.providers.base import AttemptTimeouts, ChatCall, Provider, UpstreamError
from rswitch.providers.ollama import OllamaProvider
from rswitch.providers.openai import OpenAIProvider

DEADLINE = 30.0  # what a read may take; the connection must fail long before
CONNECT = 0.2


@pytest.fixture
def unanswered_url() -> Iterator[str]:
    """A loopback port whose accept queue is full: a new connection is never completed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # takes the queue's only place
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        filler.close()
        server.close()


async def attempt(p: Provider, streamed: bool) -> UpstreamError:
    call = ChatCall(model="m", messages=[{"role": "user", "content": "hi"}], timeout=DEADLINE)
    await p.start()
    try:
        with pytest.raises(UpstreamError) as info:
            async with asyncio.timeout(DEADLINE / 3):  # far less than the deadline, far more than CONNECT
                if streamed:
                    async for _ in p.stream(call):
                        pass
                else:
                    await p.complete(call)
    finally:
        await p.close()
    return info.value


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
async def test_connect_timeout_fails_the_attempt_as_unreachable(
    unanswered_url: str, kind: str, streamed: bool
) -> None:
    settings = ProviderConfig(type=kind, base_url=unanswered_url, timeout_seconds=DEADLINE)
    cls = {"openai": OpenAIProvider, "anthropic": AnthropicProvider, "ollama": OllamaProvider}[kind]
    p = cls(kind, settings, "sk-test")
    p.timeouts = AttemptTimeouts(connect=CONNECT, first_byte=DEADLINE, idle=DEADLINE)
    err = await attempt(p, streamed)
    assert (err.status, err.code, err.retryable) == (502, "upstream_unreachable", True)
    assert "ConnectTimeout" in err.message or "ConnectionTimeout" in err.message


async def test_openai_connect_limit_is_the_sockets_not_the_wait_for_a_pooled_connection() -> None:
    """aiohttp's `connect` also counts waiting for a free pooled connection: a busy pool is not
    an unreachable upstream, so only the socket's connect gets the short limit."""
    settings = ProviderConfig(type="openai", base_url="http://127.0.0.1:9/v1", timeout_seconds=DEADLINE)
    p = OpenAIProvider("openai", settings, None)
    p.timeouts = AttemptTimeouts(connect=CONNECT, first_byte=DEADLINE, idle=DEADLINE)
    call = ChatCall(model="m", messages=[{"role": "user", "content": "hi"}], timeout=DEADLINE)
    for streamed in (False, True):
        limit = p._timeout(call, streamed)
        assert (limit.connect, limit.sock_connect, limit.sock_read) == (DEADLINE, CONNECT, DEADLINE)
