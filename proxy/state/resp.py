"""A small Redis client for the hot path: one pipelined connection, hiredis parsing.

Every caller's command goes out on the same connection as soon as it is made, and the
replies come back in order, so concurrent requests share one socket without waiting
for each other (implicit pipelining). A caller that stops waiting (a timeout, a
cancellation) leaves its slot in the queue: its reply is read and dropped, and the
replies after it still reach their callers. Measured in bench/: about a quarter of
redis-py's CPU per call, which is what keeps the shared store within reach of the
in-process one (see bench/state_bench.py).

URLs: redis://[[user]:password@]host[:port][/db] and rediss:// (TLS).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


class ReplyError(Exception):
    """The server answered with an error (-ERR ...)."""


def encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.WriteTransport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's: no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if not self._waiting:
                continue  # nothing asked for this (cannot happen with a sane server)
            future = self._waiting.popleft()
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the server closed the connection")
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(str(self.lost)))

    def send(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        if self.lost is not None or self._transport is None:
            raise ConnectionError("not connected")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._transport.write(encode(args))
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class Script:
    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's own id


class Client:
    """`await call("GET", "k")`; `await run(script, args)` (EVALSHA, loading on NOSCRIPT)."""

    def __init__(self, url: str, connect_timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported state URL scheme {parts.scheme!r} (redis, rediss)")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.db = int(parts.path.strip("/") or 0)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.connect_timeout = connect_timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connect(self) -> _Connection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.lost is None:
                return conn
            loop = asyncio.get_running_loop()
            context = ssl.create_default_context() if self.tls else None
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=context
                )
                try:
                    if self.password is not None:
                        who = (self.username,) if self.username else ()
                        await conn.send(("AUTH", *who, self.password))
                    if self.db:
                        await conn.send(("SELECT", self.db))
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
            return conn

    async def call(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None or conn.lost is not None:
            conn = await self._connect()
        return await conn.send(args)

    async def run(self, script: Script, args: list[Any]) -> Any:
        try:
            return await self.call("EVALSHA", script.sha, 0, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", script.source)
        return await self.call("EVALSHA", script.sha, 0, *args)

    def drop(self) -> None:
        """Close the connection (after a timeout its state is unknown); the next call dials."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        self.drop()
