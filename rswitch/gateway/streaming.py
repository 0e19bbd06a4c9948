"""A committed stream: upstream chunks passed through as server-sent events, usage on the
last chunk, `[DONE]` only after a complete answer. It records itself when it ends.

When the upstream breaks after content went out (a cut, an error event, a silence longer than
the provider's idle limit), the stream goes on on the next candidate: a model that continues
a trailing assistant message gets the partial answer as one (prefill); any other gets the
request again, and the part of its answer the client already has is dropped. The client sees
one stream — one id, no repeated text, one finish, one `[DONE]` — whose usage adds up every
attempt; each attempt is recorded with the part it produced."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from rswitch.gateway import attempts
from rswitch.gateway.attempts import Attempt, Plan
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


class Replay:
    """Drops, from a replayed answer, the text the client already has; notes where the new
    answer stops agreeing with it."""

    def __init__(self, sent: str) -> None:
        self.sent = sent
        self.pos = 0
        self.diverged_at: int | None = None

    def feed(self, text: str) -> str:
        """What of `text` the client has not seen."""
        need = len(self.sent) - self.pos
        if need <= 0:
            return text
        head, rest = text[:need], text[need:]
        if self.diverged_at is None:
            seen = self.sent[self.pos : self.pos + len(head)]
            if head != seen:
                self.diverged_at = self.pos + next(
                    i for i, (a, b) in enumerate(zip(head, seen, strict=True)) if a != b
                )
        self.pos += len(head)
        return rest

    @property
    def diverged(self) -> int | None:
        """Where the replayed answer stopped matching what was sent: the first differing
        character, or where it ended short of it; None when it matched all of it."""
        if self.diverged_at is not None:
            return self.diverged_at
        return self.pos if self.pos < len(self.sent) else None


class _Ended(Exception):
    """The stream could not go on; its last attempt is already recorded."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__(error.message)
        self.error = error


class StreamSession:
    """Iterate it for SSE bytes."""

    def __init__(
        self,
        gateway: Gateway,
        p: Prepared,
        plan: Plan,
        attempt: Attempt,
        agen: AsyncIterator[dict[str, Any]],
        held: list[dict[str, Any]],
    ) -> None:
        self.gateway = gateway
        self.p = p
        self.plan = plan
        self.attempt = attempt
        self.combination = attempt.combo  # the combination that started the stream
        self._agen = agen
        self._held = held
        self._ttft: float | None = None  # this attempt's time to its first token
        self._sent: list[str] = []  # the text the client has received, all attempts
        self._own: list[str] = []  # the text this attempt produced (a replay: from its start)
        self._tools = False  # tool-call deltas went out: such a stream is not continued
        self._replay: Replay | None = None
        self._billed = [0, 0]  # prompt, completion tokens of the attempts before this one
        self._continued = False  # another attempt took over after a break
        self._recorded = False  # this attempt is recorded (it broke; its successor is not open yet)
        self._id: str | None = None
        self._created: int | None = None
        flight = gateway.inflight.get(p.request_id)  # the console counts the pieces as they come
        flight.stage, flight.parts = STREAMING, self._sent

    @property
    def provider(self) -> str:
        return self.combination.provider

    @property
    def started(self) -> float:
        return self.attempt.started

    # -- reading ----------------------------------------------------------------------------

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        for chunk in self._held:
            yield chunk
        self._held = []
        while True:
            try:
                chunk = await attempts.read(self.attempt, self._agen)
            except StopAsyncIteration:
                return
            yield chunk

    def _shape(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The chunk as the client gets it (None: nothing to send), noting its text. A
        continuation keeps the stream's id and drops its own opening and replayed text."""
        continued = self._continued
        if not self._id:  # Azure's first chunk (the prompt's filter results) has the id ""
            self._id, self._created = chunk.get("id") or None, chunk.get("created")
        elif continued:
            chunk["id"], chunk["created"] = self._id, self._created
        choices = chunk.get("choices") or []
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("tool_calls"):
                self._tools = True
            text = delta.get("content")
            if (text or delta.get("tool_calls")) and self._ttft is None:
                self._ttft = (time.perf_counter() - self.attempt.started) * 1000
            if continued and "role" in delta:
                delta = {k: v for k, v in delta.items() if k != "role"}
                choice["delta"] = delta
            if isinstance(text, str) and text:
                self._own.append(text)
                if self._replay is not None:
                    text = self._replay.feed(text)
                    delta["content"] = text
                if text:
                    self._sent.append(text)
            if (
                continued
                and not delta.get("content")
                and not delta.get("tool_calls")
                and not choice.get("finish_reason")
            ):
                return None if len(choices) == 1 and not chunk.get("usage") else chunk
        return chunk

    # -- a break mid-stream -------------------------------------------------------------------

    def _continuable(self, e: UpstreamError) -> bool:
        n = self.p.params.get("n")
        return e.retryable and not self._tools and (n is None or n == 1)

    async def _go_on(self, e: UpstreamError) -> None:
        """The attempt broke after content went out: record it with its part, then open the
        next candidate that continues the text sent; raise _Ended when none can."""
        g, p, a = self.gateway, self.p, self.attempt
        await attempts.aclose(self._agen)
        pt, ct = g.failed(
            p, a.combo, a.system, e, a.number, a.started, True, a.est, "".join(self._own), self._ttft
        )
        self._recorded = True
        self.plan.last = e  # what ends the stream if no candidate continues it
        self._billed[0] += pt
        self._billed[1] += ct
        if not self._continuable(e):
            raise _Ended(e)
        # a stream that was flowing gets time to find its continuation past the request deadline
        self.plan.deadline = max(self.plan.deadline, time.perf_counter() + g.request_timeout / 2)
        sent = "".join(self._sent)
        try:
            opened = await g.open_attempt(p, self.plan, continuing=sent)
        except GatewayError as err:  # a continuation refused as the client's mistake
            raise _Ended(
                UpstreamError(err.status, err.message, error_type=err.error_type, code=err.code)
            ) from None
        if opened is None:
            raise _Ended(self.plan.last or e)
        self.attempt, self._agen, self._held = opened
        self._own, self._ttft, self._continued, self._recorded = [], None, True, False
        self.plan.flight.stage = STREAMING
        self._replay = Replay(sent) if self.attempt.replay else None
        g.event(
            "fallback",
            f"{self.attempt.combo.id} continues request {p.request_id[:8]} after {len(sent)} chars",
        )

    # -- ending -------------------------------------------------------------------------------

    def _settle_client(self) -> None:
        """An unfinished stream gives the caller's key back its tpm estimate less the streamed part."""
        if self.p.client is not None:
            self.p.client.settle(estimate_tokens("".join(self._sent)))

    def _broken(self, exc: Exception) -> bytes:
        """The error event that ends a broken stream (never a clean close), recorded first."""
        g, p = self.gateway, self.p
        self._settle_client()
        if isinstance(exc, _Ended):  # every upstream break goes through _go_on, which recorded it
            err = g.to_client_error(exc.error)
        else:  # rswitch's own bug: logged, answered as ours, not held against the upstream
            log.error(
                "internal error while streaming request %s from %s",
                p.request_id,
                self.attempt.combo.id,
                exc_info=exc,
            )
            err = GatewayError(
                500, f"internal error while streaming: {type(exc).__name__}", error_type="server_error"
            )
            try:
                if not self._recorded:
                    self._record_unfinished(err)
            except Exception:  # the recording itself is what broke: the client still gets its event
                log.exception("could not record request %s", p.request_id)
        err.attempts = list(p.chain) or None
        g.finish(p, err.status)
        return sse(err.body())

    def _record_unfinished(self, error: UpstreamError | GatewayError) -> None:
        """Record the part that was streamed, not held against the upstream's health, and settle
        its token estimate against that part."""
        a = self.attempt
        self.gateway.breakers.release(a.combo.id)
        pt, ct, _, _ = self._record(ok=False, error=error, observe=False)
        self.gateway.settle(a.combo, a.est, pt, ct)

    def _record(self, **outcome: Any) -> tuple[int, int, bool, float]:
        """Record this attempt: the row keeps the whole text sent, its tokens count its own part."""
        a = self.attempt
        return self.gateway.record(
            self.p,
            a.combo,
            a.system,
            output="".join(self._sent),
            billed="".join(self._own),
            ttft_ms=self._ttft,
            stream=True,
            attempt=a.number,
            started=a.started,
            **outcome,
        )

    def _ending(
        self, usage: dict[str, Any] | None, finish: dict[str, Any] | None, last: dict[str, Any]
    ) -> list[bytes]:
        """Record the complete answer, then the events that end it: the held-back finish chunk
        carrying the usage of every attempt (or OpenAI's usage-only chunk), and [DONE]."""
        g, p, a = self.gateway, self.p, self.attempt
        diverged = None if self._replay is None else self._replay.diverged
        note = None if diverged is None else {"diverged_at": diverged}  # the row says so too
        pt, ct, estimated, _ = self._record(ok=True, usage=usage, before=sum(self._billed), note=note)
        g.settle(a.combo, a.est, pt, ct)
        pt, ct = pt + self._billed[0], ct + self._billed[1]
        final_usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        if usage:
            final_usage = {**usage, **final_usage}
        if estimated or self._billed != [0, 0]:  # a broken attempt's tokens are estimated
            final_usage["estimated"] = True
        meta = None
        if self._continued:
            meta = {"attempts": list(p.chain), "continued": True}
            if diverged is not None:
                meta["diverged_at"] = diverged  # the replayed answer differs from what was sent from here
        out = []
        if finish is not None:
            end = {**finish, "usage": final_usage}
            if meta is not None and not p.client_usage:
                end["rswitch"] = meta
            out.append(sse(end))
        if p.client_usage or finish is None:
            end = {**last, "object": "chat.completion.chunk", "choices": [], "usage": final_usage}
            if meta is not None:
                end["rswitch"] = meta
            out.append(sse(end))
        out.append(DONE)
        return out

    async def __aiter__(self) -> AsyncIterator[bytes]:
        usage: dict[str, Any] | None = None
        finish: dict[str, Any] | None = None  # held back so usage can ride on it
        ended: set[int] = set()  # choices whose finish_reason came
        choices_asked = self.p.params.get("n") or 1
        last = {"id": None, "model": self.combination.model, "created": int(self.p.created)}
        g, p = self.gateway, self.p
        outcome: str = "client_closed"
        try:
            try:
                while True:
                    try:
                        async for chunk in self._chunks():
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                                if chunk.get("choices"):  # vLLM's running count, Mistral's on its finish:
                                    chunk["usage"] = None  # only the end carries usage, every attempt's
                            shaped = self._shape(chunk)
                            last["id"] = self._id or last["id"]
                            last["model"] = chunk.get("model", last["model"])
                            last["created"] = self._created or last["created"]
                            if shaped is None:
                                continue
                            choices = shaped.get("choices") or []
                            if not choices:
                                continue  # the upstream's usage-only chunk: re-emitted at the end
                            if finish is not None:  # n > 1: another choice is still streaming
                                yield sse(finish)
                                finish = None
                            ended.update(c.get("index", 0) for c in choices if c.get("finish_reason"))
                            if not p.client_usage and any(c.get("finish_reason") for c in choices):
                                finish = shaped
                                continue
                            yield sse(shaped)
                        break
                    except UpstreamError as e:
                        if len(ended) >= choices_asked:  # the answer was whole: at most its usage was lost
                            await attempts.aclose(self._agen)
                            break
                        usage = None
                        await self._go_on(e)
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
                await attempts.aclose(self._agen)
                closed = UpstreamError(
                    499,
                    "client closed the stream before it ended",
                    error_type="client_closed",
                    retryable=False,
                )
                if not self._recorded:  # else it left while the next attempt was being opened
                    self._record_unfinished(closed)
                g.finish(p, 499)

    async def aclose(self) -> None:
        await attempts.aclose(self._agen)

    def __del__(self) -> None:
        # a stream never iterated (its client left before the response began) ends here
        self.gateway.inflight.end(self.p.request_id)
