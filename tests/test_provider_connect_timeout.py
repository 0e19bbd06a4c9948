"""A host that never takes the connection fails an attempt after the provider's connect timeout,
not after its whole deadline, so a fallback still gets its turn (Anthropic and Ollama)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from rswitch.config import ProviderConfig
from rswitch.providers.anthropic import AnthropicProvider
from rswitch.providers.base import AttemptTimeouts, ChatCall, Provider, UpstreamError
from rswitch.providers.ollama import OllamaProvider

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
@pytest.mark.parametrize("kind", ["anthropic", "ollama"])
async def test_connect_timeout_fails_the_attempt_as_unreachable(
    unanswered_url: str, kind: str, streamed: bool
) -> None:
    settings = ProviderConfig(type=kind, base_url=unanswered_url, timeout_seconds=DEADLINE)
    cls = AnthropicProvider if kind == "anthropic" else OllamaProvider
    p = cls(kind, settings, "sk-test")
    p.timeouts = AttemptTimeouts(connect=CONNECT, first_byte=DEADLINE, idle=DEADLINE)
    err = await attempt(p, streamed)
    assert (err.status, err.code, err.retryable) == (502, "upstream_unreachable", True)
    assert "ConnectTimeout" in err.message
