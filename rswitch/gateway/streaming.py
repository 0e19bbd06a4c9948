"""A committed stream: upstream chunks passed through as server-sent events, usage on the
last chunk, `[DONE]` only after a complete answer. It records itself when it ends."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from rswitch.gateway.balancer import Combination
from rswitch.gateway.errors import GatewayError
from rswitch.gateway.inflight import STREAMING
from rswitch.gateway.request import Prepared
from rswitch.providers.base import UpstreamError
from rswitch.providers.pricing import estimate_tokens

if TYPE_CHECKING:
    from rswitch.gateway.pipeline import Gateway

log = logging.getLogger("rswitch.gateway")

DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    """JSON bytes. orjson refuses text that is not valid UTF-8 (an upstream's lone surrogate,
    "\\ud800"); the standard library writes such text escaped, which is valid JSON."""
    try:
        return orjson.dumps(obj, default=str)
    except orjson.JSONEncodeError:
        return json.dumps(obj, default=str).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return bool(chunk.get("usage"))


class StreamSession:
    """Iterate it for SSE bytes."""

    def __init__(
        self,
        gateway: Gateway,
        p: Prepared,
        combo: Combination,
        system: str,
        agen: AsyncIterator[dict[str, Any]],
        held: list[dict[str, Any]],
        est: int,
        attempt: int,
        started: float,
    ) -> None:
        self.gateway = gateway
        self.p = p
        self.combination = combo
        self.system = system
        self._agen = agen
        self._held = held
        self._est = est
        self._attempt = attempt
        self.started = started  # when this attempt began: its latency and time to first token count from here
        self._ttft: float | None = None
        self._parts: list[str] = []
        flight = gateway.inflight.get(p.request_id)  # the console counts the pieces as they come
        flight.stage, flight.parts = STREAMING, self._parts

    @property
    def provider(self) -> str:
        return self.combination.provider

    def _observe(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if (text or delta.get("tool_calls")) and self._ttft is None:
                self._ttft = (time.perf_counter() - self.started) * 1000
            if text:
                self._parts.append(text)

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in self._held:
            yield chunk
        self._held = []
        async for chunk in self._agen:
            yield chunk

    def _settle_client(self) -> None:
        """An unfinished stream gives the caller's key back its tpm estimate less the streamed part."""
        if self.p.client is not None:
            self.p.client.settle(estimate_tokens("".join(self._parts)))

    def _broken(self, exc: Exception) -> bytes:
        """The error event that ends a broken stream (never a clean close), recorded first."""
        g, p = self.gateway, self.p
        self._settle_client()
        if isinstance(exc, UpstreamError):
            used = estimate_tokens("".join(self._parts))
            g.failed(
                p, self.combination, self.system, exc, self._attempt, self.started, True, self._est, used
            )
            err = g.to_client_error(exc)
        else:  # rswitch's own bug: logged, answered as ours, not held against the upstream
            log.error(
                "internal error while streaming request %s from %s",
                p.request_id,
                self.combination.id,
                exc_info=exc,
            )
            err = GatewayError(
                500, f"internal error while streaming: {type(exc).__name__}", error_type="server_error"
            )
            try:
                self._record_unfinished(err)
            except Exception:  # the recording itself is what broke: the client still gets its event
                log.exception("could not record request %s", p.request_id)
        g.finish(p, err.status)
        return sse(err.body())

    def _record_unfinished(self, error: UpstreamError | GatewayError) -> None:
        """Record the part that was streamed, not held against the upstream's health, and settle
        its token estimate against that part."""
        self.gateway.settle(self.combination, self._est, 0, estimate_tokens("".join(self._parts)))
        self._record(ok=False, error=error, observe=False)

    def _record(self, **outcome: Any) -> tuple[int, int, bool, float]:
        """Record this attempt with what was streamed so far and how it ended."""
        return self.gateway.record(
            self.p,
            self.combination,
            self.system,
            output="".join(self._parts),
            ttft_ms=self._ttft,
            stream=True,
            attempt=self._attempt,
            started=self.started,
            **outcome,
        )

    def _ending(
        self, usage: dict[str, Any] | None, finish: dict[str, Any] | None, last: dict[str, Any]
    ) -> list[bytes]:
        """Record the complete answer, then the events that end it: the held-back finish chunk
        carrying the usage (or OpenAI's usage-only chunk), and [DONE]."""
        g, p = self.gateway, self.p
        pt, ct, estimated, _ = self._record(ok=True, usage=usage)
        g.settle(self.combination, self._est, pt, ct)
        final_usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        if usage:
            final_usage = {**usage, **final_usage}
        if estimated:
            final_usage["estimated"] = True
        out = []
        if finish is not None:
            out.append(sse({**finish, "usage": final_usage}))
        if p.client_usage or finish is None:
            out.append(sse({**last, "object": "chat.completion.chunk", "choices": [], "usage": final_usage}))
        out.append(DONE)
        return out

    async def __aiter__(self) -> AsyncIterator[bytes]:
        usage: dict[str, Any] | None = None
        finish: dict[str, Any] | None = None  # held back so usage can ride on it
        last = {"id": None, "model": self.combination.model, "created": int(self.p.created)}
        g, p = self.gateway, self.p
        outcome: str = "client_closed"
        try:
            try:
                async for chunk in self._chunks():
                    last["id"] = chunk.get("id", last["id"])
                    last["model"] = chunk.get("model", last["model"])
                    last["created"] = chunk.get("created", last["created"])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    self._observe(chunk)
                    choices = chunk.get("choices") or []
                    if not choices:
                        continue  # the upstream's usage-only chunk: re-emitted at the end
                    if finish is not None:  # n > 1: another choice is still streaming
                        yield sse(finish)
                        finish = None
                    if not p.client_usage and any(c.get("finish_reason") for c in choices):
                        finish = chunk
                        continue
                    yield sse(chunk)
                ending = self._ending(usage, finish, last)
            except Exception as exc:  # upstream trouble, or a bug of ours up to the last event
                outcome = "error"
                yield self._broken(exc)
                return
            outcome = "ok"
            g.finish(p, 200)
            for event in ending:
                yield event
        finally:
            g.inflight.end(p.request_id)
            if outcome == "client_closed":
                self._settle_client()
                # the client went away mid-stream: close the upstream and record what happened
                await aclose(self._agen)
                closed = UpstreamError(
                    499,
                    "client closed the stream before it ended",
                    error_type="client_closed",
                    retryable=False,
                )
                self._record_unfinished(closed)
                g.finish(p, 499)

    async def aclose(self) -> None:
        await aclose(self._agen)

    def __del__(self) -> None:
        # a stream never iterated (its client left before the response began) ends here
        self.gateway.inflight.end(self.p.request_id)


async def aclose(agen: Any) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass
