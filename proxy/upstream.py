"""The upstream HTTP/1.1 client of the request path: one keep-alive pool per provider.

    client.post(url, body, extra headers, connect, read) ─► http1.Response
    an idle connection is reused (most recent first); one the upstream had closed before
    answering is replaced once; idle ones close after `KEEPALIVE_S`; `MAX_IDLE` per origin

Why not aiohttp: one request through `aiohttp.ClientSession` ran ~3,500 bytecodes, half of
all the gateway did for a request (README, Benchmarks). This does what the request path
needs and nothing more: no redirects (a 3xx is an answer, never followed), no cookies, no
proxies from the environment, HTTP/1.1 only. The connection and its answer: `http1`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine, Mapping
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from .http1 import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    STEP,
    ConnectError,
    Connection,
    ConnectTimeout,
    Disconnected,
    Headers,
    PayloadError,
    ProtocolError,
    ReadTimeout,
    Response,
)

__all__ = [
    "HIGH_WATER", "MAX_HEAD_BYTES", "STEP", "Client", "ConnectError", "ConnectTimeout",
    "Disconnected", "Headers", "PayloadError", "ProtocolError", "ReadTimeout", "Response",
    "Target", "encode_headers", "target",
]  # fmt: skip

KEEPALIVE_S = 15.0
MAX_IDLE = 64  # per origin


class Target(NamedTuple):
    origin: tuple[str, str, int]  # scheme, host, port: the pool's key
    host_header: bytes
    path: bytes


@lru_cache(maxsize=1024)
def target(url: str) -> Target:
    """`http(s)://host[:port]/path?query`, parsed once per URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    port = parts.port or (443 if scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    netloc = f"[{host}]" if ":" in host else host
    host_header = netloc if parts.port is None else f"{netloc}:{port}"
    return Target((scheme, host, port), host_header.encode("idna"), path.encode())


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """Header lines, UTF-8; a name or value with a line break or NUL is refused."""
    lines = []
    for name, value in headers.items():
        if any(c in s for s in (name, value) for c in "\r\n\0") or ":" in name or not name:
            raise ValueError(f"header {name!r} has a character not allowed in HTTP headers")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("utf-8")


class Client:
    """A pool of keep-alive connections and the requests made over them."""

    def __init__(self, headers: Mapping[str, str], ssl_context: ssl.SSLContext | None = None):
        self._head = encode_headers(
            {"Accept-Encoding": "gzip, deflate", **headers, "Connection": "keep-alive"}
        )
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._live: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    def post(
        self,
        url: str,
        body: bytes,
        extra: bytes = b"",
        connect: float = 30.0,
        read: float | None = None,
    ) -> Coroutine[Any, Any, Response]:
        """Send `body`; the answer once its headers are in. `extra`: more header lines
        (`encode_headers`); `read`: the longest wait for any bytes, None for none."""
        return self._request(b"POST", url, body, extra, connect, read)

    def get(
        self, url: str, connect: float = 30.0, read: float | None = None
    ) -> Coroutine[Any, Any, Response]:
        return self._request(b"GET", url, b"", b"", connect, read)

    async def _request(
        self, method: bytes, url: str, body: bytes, extra: bytes, connect: float, read: float | None
    ) -> Response:
        where = target(url)
        head = b"%b %b HTTP/1.1\r\nHost: %b\r\n%b%bContent-Length: %d\r\n\r\n" % (
            method, where.path, where.host_header, self._head, extra, len(body)
        )  # fmt: skip
        for _ in range(2):
            conn = self._pooled(where.origin)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(where.origin, connect)
            try:
                return await conn.send(head, body, read)
            except Disconnected:
                if not (reused and conn.answer_bytes == 0):
                    raise
                # a pooled connection the upstream had closed: once more on a new one
        raise Disconnected("the upstream closed the connection")  # pragma: no cover

    def _pooled(self, origin: tuple[str, str, int]) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, origin: tuple[str, str, int], seconds: float) -> Connection:
        if self._closed:
            raise ConnectError("the client is closed")
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            tls = self._ssl or _default_ssl()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, origin), host, port, ssl=tls,
                    server_hostname=host if tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {host}:{port} within {seconds} s") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        self._live.add(conn)
        return conn

    def _release(self, conn: Connection) -> None:
        if self._closed or conn.closed:
            conn.abort()
            return
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= MAX_IDLE:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(KEEPALIVE_S, self._expire)

    def _expire(self) -> None:
        """Close connections idle for longer than `KEEPALIVE_S`."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        stale_before = loop.time() - KEEPALIVE_S
        waiting = False
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= stale_before or c.closed]:
                idle.remove(conn)
                conn.abort()
            waiting = waiting or bool(idle)
        if waiting:
            self._sweep = loop.call_later(KEEPALIVE_S, self._expire)

    def _forget(self, conn: Connection) -> None:
        self._live.discard(conn)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._live):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports report their end


@lru_cache(maxsize=1)
def _default_ssl() -> ssl.SSLContext:
    return ssl.create_default_context()
