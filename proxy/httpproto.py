"""Bounds on what a client may make the server hold, for uvicorn's httptools protocol.

httptools has no header limit: uvicorn buffers a 100 MB header and accepts 100k headers.
`bounded_protocol(limits)` is a `HttpToolsProtocol` subclass that answers 431 once a
request's head (request line + headers) passes `max_header_bytes` or has more than
`max_headers` headers, closes a connection whose request head does not arrive within
`header_timeout` (silent or slowloris connections) or whose body does not arrive within
`body_timeout` after its head. Idle keep-alive connections are closed by uvicorn's
`timeout_keep_alive`, and `limit_concurrency` answers 503 past `max_connections`
connections or requests, before file descriptors run short. uvicorn's proxy headers are
off (`server.trusted_proxies` decides whom to believe).

`uvicorn_options(server_spec)` gives the `uvicorn.run`/`uvicorn.Config` keywords; the
protocol reads its limits from the served gateway's config, connection by connection.

It also tells the app when a client leaves, without a task per request waiting on
`receive()`: the scope's extension `ON_DISCONNECT` is a function; `hook(callback)` calls
`callback()` once if the connection is lost before `hook(None)`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .config import ServerSpec

log = logging.getLogger("omnimind.httpproto")


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 60.0

    @classmethod
    def from_server(cls, server: ServerSpec) -> Limits:
        return cls(
            server.max_header_bytes, server.max_headers, server.header_timeout, server.body_timeout
        )


def _status(code: int, reason: str, message: str) -> bytes:
    body = b'{"error":{"message":"%b","type":"invalid_request_error","param":null,"code":"%b"}}' % (
        message.encode(),
        reason.lower().replace(" ", "_").encode(),
    )
    return (
        b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%b" % (code, reason.encode(), len(body), body)
    )


_TOO_LARGE = _status(431, "Request Header Fields Too Large", "Request headers are too large.")
_TIMEOUT = _status(408, "Request Timeout", "The request did not arrive in time.")


class _HeadTooLarge(Exception):
    pass


_HEAD, _BODY, _APP = 0, 1, 2  # waiting for / reading a head; reading a body; app's turn
ON_DISCONNECT = "omnimind.on_disconnect"  # the scope extension (see the module doc)


class _Hook:
    """A request's `ON_DISCONNECT` function. Weak references only: the scope that holds
    it must keep neither the connection nor the request alive (no cycle through it)."""

    __slots__ = ("_protocol", "_cycle")

    def __init__(self, protocol: BoundedHttpToolsProtocol, cycle: object) -> None:
        self._protocol = weakref.ref(protocol)
        self._cycle = weakref.ref(cycle)

    def __call__(self, callback: Callable[[], None] | None) -> None:
        protocol, cycle = self._protocol(), self._cycle()
        if protocol is not None and cycle is not None:
            protocol.watch(cycle, callback)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on a request's head and on slow clients.

    Cheap per request: a phase and its start time are noted at each step; one timer per
    connection, fired at most once per `header_timeout`, compares them with the limits
    (no timer is armed or cancelled per request).
    """

    limits: Limits | None = None  # None: the served gateway's `server` settings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = self.limits or _limits_of(self.app)
        self._phase = _HEAD
        self._since = 0.0
        self._head_bytes = 0
        self._too_large = False
        self._watch: asyncio.TimerHandle | None = None
        self._on_lost: dict[object, Callable[[], None]] = {}  # request cycle -> callback

    # -- one watchdog per connection -------------------------------------------------------

    def _check(self) -> None:
        self._watch = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._phase == _APP:  # the app's own time is the request deadline's business
            wait = self._limits.header_timeout
        else:
            limit = (
                self._limits.header_timeout if self._phase == _HEAD else self._limits.body_timeout
            )
            wait = self._since + limit - now
            if wait <= 0:
                if self._phase == _HEAD and self._head_bytes:  # say why we hang up
                    self.transport.write(_TIMEOUT)
                # Silent, slow head, or a body that does not come (the app sees a disconnect).
                self.transport.close()
                return
        self._watch = self.loop.call_later(max(wait, 0.05), self._check)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = self.loop.time()  # a silent connection is closed too
        self._watch = self.loop.call_later(self._limits.header_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)
        lost, self._on_lost = self._on_lost, {}
        for callback in lost.values():
            callback()

    def watch(self, cycle: object, callback: Callable[[], None] | None) -> None:
        """`callback()` once if the connection is lost while `cycle` runs; None: stop."""
        if callback is None:
            self._on_lost.pop(cycle, None)
            return
        self._on_lost[cycle] = callback
        if self.transport.is_closing() or getattr(cycle, "disconnected", False):
            self.loop.call_soon(self._lost, cycle)  # already gone: soon, unless stopped

    def _lost(self, cycle: object) -> None:
        callback = self._on_lost.pop(cycle, None)
        if callback is not None:
            callback()

    # -- the head's size and count --------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._phase != _BODY:
            if self._phase == _APP:  # the next request's first bytes
                self._phase, self._since = _HEAD, self.loop.time()
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._phase == _HEAD
            and self._head_bytes > self._limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._reject_head()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._reject_head()
        else:
            super().send_400_response(msg)

    def _reject_head(self) -> None:
        self._phase = _APP
        self.transport.write(_TOO_LARGE)
        self.transport.close()

    def on_headers_complete(self) -> None:
        limits = self._limits
        if len(self.headers) > limits.max_headers or (
            # a head that came whole in one read: its bytes counted may include body bytes
            self._head_bytes > limits.max_header_bytes
            and _head_size(self.url, self.headers) > limits.max_header_bytes
        ):
            self._too_large = True
            raise _HeadTooLarge  # httptools stops; uvicorn answers via send_400_response
        self._phase, self._since = _BODY, self.loop.time()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request (not an upgrade)
            hook: Any = _Hook(self, cycle)  # ASGI types extensions as dicts; ours is a function
            extensions = self.scope.get("extensions") or {}
            self.scope["extensions"] = {**extensions, ON_DISCONNECT: hook}

    def on_message_complete(self) -> None:
        self._phase = _APP
        self._head_bytes = 0
        super().on_message_complete()


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + 16 + sum(len(name) + len(value) + 4 for name, value in headers)


def _limits_of(app: object) -> Limits:
    """The limits in the served gateway's config (read per connection: reloads apply)."""
    server = getattr(getattr(getattr(app, "gateway", None), "config", None), "server", None)
    return Limits.from_server(server) if isinstance(server, ServerSpec) else Limits()


def bounded_protocol(limits: Limits) -> type[BoundedHttpToolsProtocol]:
    """A protocol class carrying fixed `limits` (for apps that are not the gateway; such a
    class cannot cross to `--workers` processes, the module's own class can)."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


def uvicorn_options(server: ServerSpec) -> dict[str, Any]:
    """Keywords for `uvicorn.run`/`uvicorn.Config`: the bounded protocol, keep-alive
    timeout and the connection cap (answered 503 past it). uvicorn's own proxy-headers
    middleware is off: it believes X-Forwarded-For from 127.0.0.1 by default, so any local
    client could pick its address; `server.trusted_proxies` decides that (edge.py)."""
    return {
        "http": BoundedHttpToolsProtocol,  # a module attribute: picklable for --workers
        "proxy_headers": False,
        "timeout_keep_alive": server.keep_alive_timeout,
        "limit_concurrency": server.max_connections,
    }
