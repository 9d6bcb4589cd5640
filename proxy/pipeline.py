"""The one request pipeline: every route, every API, as plain ASGI.

    scope ─► route table (404 / 405) ─► request id ─► edge checks ─► auth + rate limit
          ─► body (size-capped, UTF-8 JSON) ─► handler(ctx) ─► Reply
    Reply: JsonReply (one body) or StreamReply (SSE frames, relayed as they come)
    any GatewayError ─► rendered once, in the route's dialect (OpenAI or Anthropic),
                        every string redacted

A route is a handler plus one line in the table (`app.ROUTES`). A client that leaves
before its answer is ready cancels the work (and so the upstream call and its slot); a
stream that fails after it started ends with one final error frame, never silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec

from .auth import Caller
from .disconnect import ClientGone, Disconnect, unless_disconnected
from .errors import GatewayError, InvalidRequest, PayloadTooLarge
from .gateway import Gateway
from .policy import map_exception
from .render import Dialect, internal_error

log = logging.getLogger("omnimind.pipeline")
_OPENAI = Dialect()  # stateless: one for every route that does not name its own

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SSE: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class JsonReply(msgspec.Struct):
    body: bytes
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    status: int = 200
    content_type: str = "application/json"


@dataclass(slots=True)
class StreamReply:
    """SSE frames (already framed). `error_frame` renders a failure after the start;
    `close` releases what the frames hold (the upstream stream), whatever happened.

    With `end`, `frames` are JSON payloads instead: each is sent as a `data:` event (no
    generator in between: one layer less a chunk), and `end()`, once they are all sent,
    gives the stream's last bytes."""

    frames: AsyncIterator[bytes]
    headers: dict[str, str]
    error_frame: Callable[[GatewayError], bytes]
    close: Callable[[], Awaitable[None]]
    end: Callable[[], bytes] | None = None


Reply = JsonReply | StreamReply


class Context(msgspec.Struct):
    gateway: Gateway
    request_id: str
    headers: dict[str, str]
    client: str
    key_id: str = ""
    caller: Caller | None = None  # who asked, and their limits (auth.Guard.identify)
    admitted: bool = False  # the pipeline checked the limits (the route does not admit itself)
    body: bytes = b""
    path_arg: str = ""
    dialect: Dialect = _OPENAI

    def error_frame(self, exc: GatewayError) -> bytes:
        return self.dialect.frame(exc, self.gateway.redact)

    @property
    def prefer(self) -> str | None:
        return self.headers.get("x-omnimind-prefer-provider") or None


Handler = Callable[[Context], Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # exact, or a prefix ending in "/" when `prefix`
    handler: Handler
    method: str = "POST"
    dialect: Dialect = _OPENAI
    auth: bool = True
    prefix: bool = False
    admits: bool = False  # the handler admits itself (limits, chain health, cache: serve())


class Pipeline:
    """The ASGI app: routes from a table, the lifespan from the gateway."""

    def __init__(self, gateway: Gateway, routes: list[Route]) -> None:
        self.gateway = gateway
        self._exact: dict[str, list[Route]] = {}
        self._prefixed = [r for r in routes if r.prefix]
        for route in routes:
            if not route.prefix:
                self._exact.setdefault(route.path, []).append(route)
        self._by_method = {(r.path, r.method): r for r in routes if not r.prefix}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            return await self._http(scope, receive, send)
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)

    def _route(self, path: str) -> tuple[list[Route], str]:
        routes = self._exact.get(path)
        if routes is not None:
            return routes, ""
        for route in self._prefixed:
            if path.startswith(route.path) and len(path) > len(route.path):
                return [route], path[len(route.path) :]
        return [], ""

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        headers, duplicate = _headers(scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        client = gateway.client_address(scope, headers)
        ctx = Context(gateway, request_id, headers, client)
        method = scope["method"]
        route = self._by_method.get((scope["path"], method))  # the common case: one lookup
        routes: list[Route] = []
        if route is None:
            if method == "OPTIONS" and scope["path"].startswith("/v1/"):  # CORS preflight
                status, allowed = gateway.preflight(headers)
                return await _send(send, status, {**allowed, "x-request-id": request_id}, b"")
            routes, ctx.path_arg = self._route(scope["path"])
            route = next((r for r in routes if r.method == method), None)
        ctx.dialect = (route or (routes[0] if routes else _DEFAULT)).dialect
        reply: Reply
        try:
            if route is None:
                if routes:
                    raise MethodNotAllowed(f"Method {method} is not allowed on {scope['path']}")
                raise NotFound(f"Unknown path: {method} {scope['path'][:200]}")
            if duplicate:
                raise InvalidRequest(duplicate)
            gateway.edge_check(scope, headers)
            if route.auth:
                ctx.admitted = not route.admits
                ctx.caller = await gateway.authorize(headers, client, admit=ctx.admitted)
                ctx.key_id = ctx.caller.key_id
            if method == "POST":
                ctx.body = await _body(receive, gateway.config.server.max_body_bytes)
                gateway.check_body(ctx.body)
                reply = await unless_disconnected(route.handler(ctx), receive, scope)
            else:
                reply = await route.handler(ctx)
        except GatewayError as exc:
            return await _error(send, ctx, exc)
        except ClientGone:
            log.info("client disconnected; upstream call cancelled (request %s)", request_id)
            return await _error(send, ctx, _ClientClosed())
        except Exception:
            log.exception("internal error (request %s)", request_id)
            return await _error(send, ctx, internal_error())
        reply.headers["x-request-id"] = request_id
        if "origin" in headers:
            reply.headers.update(gateway.cors_headers(headers))
        if isinstance(reply, JsonReply):
            return await _send(send, reply.status, reply.headers, reply.body, reply.content_type)
        await _relay(reply, send, receive, scope, request_id, gateway)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gateway.start()
                except Exception as exc:  # noqa: BLE001 - reported to the server
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gateway.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _ClientClosed(GatewayError):
    status = 499
    type = "invalid_request_error"

    def __init__(self) -> None:
        super().__init__("Client closed the request.")


_DEFAULT = Route("", handler=None, method="")  # type: ignore[arg-type]


def _headers(scope: Scope) -> tuple[dict[str, str], str]:
    """Request headers by lower-case name, and what is wrong with them ("" if nothing):
    a credential header sent twice is refused rather than one of them picked."""
    raw = scope["headers"]
    out = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in raw}
    if len(out) == len(raw):
        return out, ""  # no name repeated: the common case, in one pass
    out = {}
    problem = ""
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name in out:
            if name in ("authorization", "x-api-key"):
                problem = f"The '{name}' header was sent more than once."
            out[name] = f"{out[name]}, {value}"
        else:
            out[name] = value
    return out, problem


async def _body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"Request body is larger than the limit of {limit} bytes.")
        if not message.get("more_body"):
            return b"".join((*parts, part)) if parts else part
        parts.append(part)


async def _error(send: Send, ctx: Context, exc: GatewayError) -> None:
    """The one place an error leaves: rendered in the route's shape, redacted."""
    status, headers, body = ctx.dialect.render(exc, ctx.gateway.redact)
    headers["x-request-id"] = ctx.request_id
    if "origin" in ctx.headers:
        headers.update(ctx.gateway.cors_headers(ctx.headers))
    await _send(send, status, headers, body)


async def _send(
    send: Send, status: int, headers: dict[str, str], body: bytes, ctype: str = "application/json"
) -> None:
    encoded = [(b"content-type", ctype.encode())] + _encode(headers)
    encoded.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})


def _encode(headers: dict[str, str]) -> Headers:
    """Header values as latin-1; anything else (a model name from the config) as UTF-8 bytes."""
    try:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    except UnicodeEncodeError:
        return [(k.encode("latin-1"), _latin1_or_utf8(v)) for k, v in headers.items()]


def _latin1_or_utf8(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


async def _relay(
    reply: StreamReply,
    send: Send,
    receive: Receive,
    scope: Scope,
    request_id: str,
    gateway: Gateway,
) -> None:
    """Send each frame as it comes. A failure after the start becomes one final error frame
    (never a silent truncation); a client disconnect cancels the upstream; a shutdown
    past its grace period ends the stream with an error frame too."""
    watch = Disconnect(receive, scope)
    task = watch.task
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": _SSE + _encode(reply.headers)})  # fmt: skip
        try:
            end = reply.end
            if end is None:
                async for frame in reply.frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                tail = b""
            else:
                async for payload in reply.frames:
                    frame = b"data: %b\n\n" % payload
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                tail = end()
        except GatewayError as exc:
            tail = reply.error_frame(exc)
        except Exception as exc:  # noqa: BLE001 - committed: report it, end cleanly
            tail = reply.error_frame(stream_failure(exc, request_id, gateway))
        except asyncio.CancelledError:
            if watch.gone and task.uncancel() == 0:
                return  # the client went away: the upstream is closed below
            if watch.gone:
                raise
            # The server is shutting down past its grace period: say so, end the stream.
            task.uncancel()
            tail = reply.error_frame(_ShuttingDown())
        await send({"type": "http.response.body", "body": tail})
    finally:
        watch.stop()
        await reply.close()


class StreamFailed(GatewayError):
    status = 502
    type = "server_error"


def stream_failure(exc: Exception, request_id: str, gateway: Gateway) -> GatewayError:
    error = map_exception(exc)
    message = gateway.redact(error.message)
    log.warning(
        "stream failed mid-way: reason=%s %s (request %s)", error.reason, message, request_id
    )
    return StreamFailed(
        f"The upstream stream failed after it started ({error.reason}).", code=str(error.reason)
    )


class _ShuttingDown(GatewayError):
    status = 503
    type = "server_error"
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down; the stream was ended.")
