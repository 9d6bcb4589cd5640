"""The HTTP surface: OpenAI's routes on Litestar, every error in OpenAI's JSON shape."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream
from litestar.types import Receive

from .chain import Answer, Engine
from .config import Config
from .errors import AllProvidersFailed, GatewayError, error_json
from .gateway import Gateway
from .policy import map_exception
from .wire import ChatRequest, encode

log = logging.getLogger("omnimind.app")

_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_OPEN_PATHS = frozenset({"/health"})
_HTTP_ERROR_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def _request_id(request: Request) -> str:
    state = request.scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        rid = request.headers.get("x-request-id") or os.urandom(16).hex()
        state["request_id"] = rid
    return str(rid)


def _answer_headers(answer: Answer, request_id: str) -> dict[str, str]:
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


async def _sse(answer: Answer, request_id: str) -> AsyncIterator[bytes]:
    """Frame chunks as SSE; a failure after the first chunk becomes one final error event.

    A stream's cost is known only at its end: it comes as the SSE comment
    `: x-omnimind-cost-usd: <usd>` before `[DONE]` (clients ignore comments).
    """
    assert answer.chunks is not None
    try:
        async for chunk in answer.chunks:
            yield b"data: " + chunk + b"\n\n"
    except Exception as exc:  # noqa: BLE001 - the stream is committed: report, end cleanly
        error = map_exception(exc)
        log.warning(
            "stream failed mid-way: provider=%s reason=%s %s",
            answer.provider, error.reason, error.message, extra={"request_id": request_id},
        )  # fmt: skip
        message = f"The upstream stream failed after it started ({error.reason})."
        yield b"data: " + error_json(message, "server_error", None, error.reason) + b"\n\n"
        return
    if answer.cost_usd is not None:
        yield f": x-omnimind-cost-usd: {answer.cost_usd:.8f}\n\n".encode()
    yield _DONE


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_disconnected(work: Coroutine[Any, Any, Answer], receive: Receive) -> Answer:
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


def provider_status(engine: Engine) -> dict[str, Any]:
    """Each provider's availability, breaker state, cooldown, last error and latency."""
    data = []
    for name, pc in engine.config.providers.items():
        health = engine.health[name].snapshot()
        gate = engine.gates[name]
        available = (
            name in engine.providers
            and health["state"] != "open"
            and health["cooldown_remaining_s"] == 0
        )
        data.append({
            "id": name,
            "type": type(pc.spec).__struct_config__.tag,
            "available": available,
            "unavailable_reason": engine.unavailable.get(name),
            "in_flight": gate.in_use,
            "queued": gate.waiting,
            **health,
        })  # fmt: skip
    return {"object": "list", "data": data}


def create_app(config: Config) -> Litestar:
    gateway = Gateway(config)

    def authorize(request: Request) -> str:
        if gateway.guard.open:
            return ""
        client = request.client.host if request.client else ""
        key_id = gateway.guard.check(request.headers, client)
        request.scope.setdefault("state", {})["key_id"] = key_id
        return key_id

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request) -> Response[bytes] | Stream:
        key_id = authorize(request)
        chat = ChatRequest(await request.body())
        request_id = _request_id(request)
        prefer = request.headers.get("x-omnimind-prefer-provider")
        engine = gateway.engine
        if chat.stream:
            answer = await engine.stream(chat, request_id, prefer, key_id)
            headers = _answer_headers(answer, request_id) | _SSE_HEADERS
            return Stream(_sse(answer, request_id), media_type="text/event-stream", headers=headers)
        answer = await _unless_disconnected(
            engine.complete(chat, request_id, prefer, key_id), request.receive
        )
        return Response(
            answer.body, media_type=MediaType.JSON, headers=_answer_headers(answer, request_id)
        )

    def _model(alias: str) -> dict[str, Any]:
        return {"id": alias, "object": "model", "created": gateway.created, "owned_by": "omnimind"}

    @get("/v1/models")
    async def list_models(request: Request) -> Response[bytes]:
        authorize(request)
        data = [_model(alias) for alias in gateway.config.models]
        return Response(encode({"object": "list", "data": data}), media_type=MediaType.JSON)

    @get("/v1/models/{alias:str}")
    async def get_model(request: Request) -> Response[bytes]:
        authorize(request)
        alias = request.path_params["alias"]
        gateway.engine.chain(alias)  # 404 model_not_found if unknown
        return Response(encode(_model(alias)), media_type=MediaType.JSON)

    @get("/v1/providers")
    async def providers(request: Request) -> Response[bytes]:
        authorize(request)
        return Response(encode(provider_status(gateway.engine)), media_type=MediaType.JSON)

    @get("/v1/stats")
    async def stats(request: Request) -> Response[bytes]:
        authorize(request)
        body = gateway.observer.stats.snapshot()
        body["providers"] = {
            p["id"]: p["available"] for p in provider_status(gateway.engine)["data"]
        }
        return Response(encode(body), media_type=MediaType.JSON)

    @get("/metrics")
    async def metrics(request: Request) -> Response[bytes]:
        if gateway.config.server.metrics_auth:
            authorize(request)
        health = {p["id"]: p for p in provider_status(gateway.engine)["data"]}
        return Response(
            gateway.observer.metrics.exposition(health),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @get("/health")
    async def health() -> Response[bytes]:
        return Response(b'{"status":"ok"}', media_type=MediaType.JSON)

    app = Litestar(
        route_handlers=[
            chat_completions, list_models, get_model, providers, stats, metrics, health
        ],
        exception_handlers={
            GatewayError: _gateway_error,
            ClientGone: _client_gone,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        on_startup=[gateway.start],
        on_shutdown=[gateway.aclose],
        request_max_body_size=config.server.max_body_bytes,
        openapi_config=None,
        logging_config=None,
    )  # fmt: skip
    app.state.gateway = gateway
    return app


def _error_response(
    request: Request, status: int, body: bytes, headers: dict[str, str] | None = None
) -> Response[bytes]:
    headers = {**(headers or {}), "x-request-id": _request_id(request)}
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _gateway_error(request: Request, exc: Exception) -> Response[bytes]:
    assert isinstance(exc, GatewayError)
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    if isinstance(exc, AllProvidersFailed):
        headers["x-omnimind-attempts"] = str(len(exc.attempts))
        if exc.attempts:
            headers["x-omnimind-fallbacks"] = ",".join(
                f"{a.provider}:{a.reason}" for a in exc.attempts
            )
    return _error_response(request, exc.status, exc.body(), headers)


def _client_gone(request: Request, exc: Exception) -> Response[bytes]:
    log.info(
        "client disconnected; upstream call cancelled", extra={"request_id": _request_id(request)}
    )
    body = error_json("Client closed the request.", "invalid_request_error", None, "client_closed")
    return _error_response(request, 499, body)


def _http_error(request: Request, exc: Exception) -> Response[bytes]:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    type_, code = _HTTP_ERROR_TYPES.get(
        status, ("invalid_request_error" if status < 500 else "server_error", None)
    )
    message = exc.detail or "Request failed"
    if status == 404:
        message = f"Unknown path: {request.method} {request.url.path}"
    elif status == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    return _error_response(request, status, error_json(message, type_, None, code), exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("internal error", exc_info=exc, extra={"request_id": _request_id(request)})
    body = error_json("The gateway hit an internal error.", "server_error", None, "internal_error")
    return _error_response(request, 500, body)
