"""The hot route, `POST /v1/chat/completions`, as plain ASGI in front of the Litestar app.

Litestar serves every other route (models, providers, stats, metrics, health) and the
lifespan. The chat route skips its per-request machinery (`Request`, signature parsing,
`Response`/`Stream`, the streaming task group): measured in bench/, that machinery cost
about a third of the gateway's CPU per request. Behaviour is the same as the other
routes': the same auth, headers, and OpenAI-shaped errors (`error_response`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from litestar import Litestar

from .errors import AllProvidersFailed, GatewayError, PayloadTooLarge, error_json
from .gateway import Gateway
from .policy import map_exception
from .streaming import Answer
from .wire import ChatRequest

log = logging.getLogger("omnimind.app")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

PATH = "/v1/chat/completions"
_JSON: Headers = [(b"content-type", b"application/json")]
_SSE: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class App:
    """The gateway's ASGI app: the chat route here, the rest in `litestar`."""

    def __init__(self, litestar: Litestar, gateway: Gateway) -> None:
        self.litestar = litestar
        self.gateway = gateway
        self.state = litestar.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            return await self.litestar(scope, receive, send)  # type: ignore[arg-type]
        request_id = ""
        prefer = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"x-omnimind-prefer-provider":
                prefer = value.decode("latin-1")
        request_id = request_id or os.urandom(16).hex()
        gateway = self.gateway
        try:
            if scope["method"] != "POST":
                raise _MethodNotAllowed(f"Method {scope['method']} is not allowed on {PATH}")
            key_id = "" if gateway.guard.open else _authorize(gateway, scope)
            chat = ChatRequest(await _body(receive, gateway.config.server.max_body_bytes))
            engine = gateway.engine
            if chat.stream:
                answer = await engine.stream(chat, request_id, prefer, key_id)
            else:
                work = engine.complete(chat, request_id, prefer, key_id)
                answer = await unless_disconnected(work, receive)
        except GatewayError as exc:
            status, extra, body = error_response(exc)
            return await _send(send, status, _encode({**extra, "x-request-id": request_id}), body)
        except ClientGone:
            log.info("client disconnected; upstream call cancelled (request %s)", request_id)
            body = error_json("Client closed the request.", "invalid_request_error", None, None)
            return await _send(send, 499, [(b"x-request-id", request_id.encode())], body)
        except Exception:
            log.exception("internal error (request %s)", request_id)
            body = error_json("The gateway hit an internal error.", "server_error", None, None)
            return await _send(send, 500, [(b"x-request-id", request_id.encode())], body)
        encoded = _encode(answer_headers(answer, request_id))
        if answer.chunks is None:
            return await _send(send, 200, encoded, answer.body)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE + encoded})
        await _relay(answer, request_id, send, receive)


class _MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


def _authorize(gateway: Gateway, scope: Scope) -> str:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    client = scope.get("client")
    return gateway.guard.check(headers, client[0] if client else "")


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
        parts.append(part)
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def _send(send: Send, status: int, headers: Headers, body: bytes) -> None:
    headers = [*_JSON, *headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _encode(headers: dict[str, str]) -> Headers:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _relay(answer: Answer, request_id: str, send: Send, receive: Receive) -> None:
    """Frame each chunk as SSE as it comes. A failure after the first chunk becomes one final
    error event (never a silent truncation); a client disconnect cancels the upstream.

    A stream's cost is known only at its end: it comes as the SSE comment
    `: x-omnimind-cost-usd: <usd>` before `[DONE]` (clients ignore comments).
    """
    chunks = answer.chunks
    assert chunks is not None
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        try:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": b"data: %b\n\n" % chunk,
                            "more_body": True})  # fmt: skip
            tail = _DONE
            if answer.cost_usd is not None:
                tail = b": x-omnimind-cost-usd: %.8f\n\n%b" % (answer.cost_usd, _DONE)
        except Exception as exc:  # noqa: BLE001 - the stream is committed: report, end cleanly
            error = map_exception(exc)
            log.warning(
                "stream failed mid-way: provider=%s reason=%s %s (request %s)",
                answer.provider, error.reason, error.message, request_id,
            )  # fmt: skip
            message = f"The upstream stream failed after it started ({error.reason})."
            tail = b"data: %b\n\n" % error_json(message, "server_error", None, error.reason)
        await send({"type": "http.response.body", "body": tail})
    except asyncio.CancelledError:
        if watcher.done() and task.uncancel() == 0:
            return  # the client went away: the upstream is closed below
        raise
    finally:
        watcher.cancel()
        await chunks.aclose()  # type: ignore[attr-defined]


async def unless_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """Await `work`, cancelling it (and so its upstream call) if the client disconnects."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


def answer_headers(answer: Answer, request_id: str) -> dict[str, str]:
    headers = {
        "x-omnimind-provider": answer.provider,
        "x-omnimind-model": answer.model,
        "x-omnimind-latency-ms": str(round(answer.latency_ms)),
        "x-omnimind-attempts": str(len(answer.attempts) + 1),
        "x-request-id": request_id,
    }
    if answer.attempts:
        headers["x-omnimind-fallbacks"] = ",".join(
            f"{a.provider}:{a.reason}" for a in answer.attempts
        )
    if answer.cost_usd is not None:
        headers["x-omnimind-cost-usd"] = f"{answer.cost_usd:.8f}"
    return headers


def error_response(exc: GatewayError) -> tuple[int, dict[str, str], bytes]:
    """The one rendering of a gateway error: status, headers, OpenAI-shaped body."""
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    if isinstance(exc, AllProvidersFailed):
        headers["x-omnimind-attempts"] = str(len(exc.attempts))
        if exc.attempts:
            headers["x-omnimind-fallbacks"] = ",".join(
                f"{a.provider}:{a.reason}" for a in exc.attempts
            )
    return exc.status, headers, exc.body()
