"""The rate-limit takes' own connection to Redis: the request path's one round trip, kept cheap.

Every request of a shared limiter runs the TAKE script once. Through redis-py's pipeline each
take cost ~27 us of the event loop's CPU (packing twelve arguments one by one, a timer and a
task per command): about what the whole rest of a request costs, and most of what state on
Redis cost in throughput. Here the takes of one moment go out as one write on a connection of
their own, the constant part of each command (script, keys, limits) packed once per limiter,
and the replies are read by hiredis's parser — the parser redis-py itself uses when hiredis is
installed. Without hiredis, or for a TLS or Unix-socket Redis, the pipeline serves instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis comes with the replicas extra
    hiredis = None


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(bulk(p) for p in parts)


def arg(value: Any) -> bytes:
    """An argument as redis-py sends it (str of an int, repr of a float, text as UTF-8)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class Partial(ConnectionError):
    """The connection broke after some replies: the batch may have been taken, never resend it."""


class TakeChannel:
    """One TCP connection to Redis for EVALSHA takes, sent and read in batches."""

    def __init__(self, client: Any, sha: str, n_fixed: int) -> None:
        kwargs = client.connection_pool.connection_kwargs
        self.host, self.port = kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
        self.username, self.password = kwargs.get("username"), kwargs.get("password")
        self.db = int(kwargs.get("db", 0) or 0)
        self.sha = sha.encode()
        self.n_fixed = n_fixed  # leading arguments that are the same for every take of a limiter
        self._heads: dict[tuple[Any, ...], bytes] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser: Any = None

    @staticmethod
    def usable(client: Any) -> bool:
        from redis.asyncio.connection import Connection

        return hiredis is not None and client.connection_pool.connection_class is Connection

    def pack(self, keys: list[str], args: list[Any]) -> bytes:
        fixed = (*keys, *args[: self.n_fixed])
        head = self._heads.get(fixed)
        if head is None:
            head = b"".join(bulk(p) for p in (b"EVALSHA", self.sha, arg(len(keys)), *(arg(x) for x in fixed)))
            self._heads[fixed] = head
        n = 3 + len(keys) + len(args)  # the rest may vary in length (a take's given-back slots)
        return b"*%d\r\n%s%s" % (n, head, b"".join(bulk(arg(x)) for x in args[self.n_fixed :]))

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._parser = hiredis.Reader()
        hello = []
        if self.password:
            auth = (self.username, self.password) if self.username else (self.password,)
            hello.append(command(b"AUTH", *(arg(a) for a in auth)))
        if self.db:
            hello.append(command(b"SELECT", arg(self.db)))
        if hello:
            for reply in await self._exchange(hello):
                if isinstance(reply, Exception):
                    raise reply

    async def _exchange(self, packed: list[bytes]) -> list[Any]:
        assert self._writer is not None and self._reader is not None
        self._writer.write(b"".join(packed))
        replies: list[Any] = []
        while len(replies) < len(packed):
            data = await self._reader.read(65536)
            if not data:
                raise (Partial if replies else ConnectionError)("Redis closed the connection")
            self._parser.feed(data)
            while (reply := self._parser.gets()) is not False:
                replies.append(reply)
        return replies

    async def run(self, packed: list[bytes]) -> list[Any]:
        """Send the takes at once and read their replies, in order (a reply error comes back as a
        hiredis.ReplyError in its place). Any other failure closes the connection: the next batch
        opens a new one."""
        reused = self._writer is not None
        try:
            if not reused:
                await self._connect()
            return await self._exchange(packed)
        except (ConnectionError, EOFError) as exc:
            self.close()
            if not reused or isinstance(exc, Partial):
                raise
        except BaseException:
            self.close()
            raise
        # a connection left from before Redis restarted: nothing of this batch reached it
        try:
            await self._connect()
            return await self._exchange(packed)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = self._parser = None
