"""The HTTP surface: OpenAI's routes on Litestar, every error in OpenAI's JSON shape.

The chat route itself is served in front of Litestar, by `fastpath.App`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException

from .config import Config
from .errors import GatewayError, error_json
from .fastpath import App, error_response
from .gateway import Gateway
from .wire import encode

log = logging.getLogger("omnimind.app")

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


def create_app(config: Config) -> App:
    """The gateway's ASGI app: `POST /v1/chat/completions` in `fastpath`, the rest here."""
    gateway = Gateway(config)

    def authorize(request: Request) -> str:
        if gateway.guard.open:
            return ""
        client = request.client.host if request.client else ""
        key_id = gateway.guard.check(request.headers, client)
        request.scope.setdefault("state", {})["key_id"] = key_id
        return key_id

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
        return Response(encode(gateway.engine.provider_status()), media_type=MediaType.JSON)

    @get("/v1/stats")
    async def stats(request: Request) -> Response[bytes]:
        authorize(request)
        body = gateway.observer.stats.snapshot()
        body["providers"] = {
            p["id"]: p["available"] for p in gateway.engine.provider_status()["data"]
        }
        return Response(encode(body), media_type=MediaType.JSON)

    @get("/metrics")
    async def metrics(request: Request) -> Response[bytes]:
        if gateway.config.server.metrics_auth:
            authorize(request)
        health = {p["id"]: p for p in gateway.engine.provider_status()["data"]}
        return Response(
            gateway.observer.metrics.exposition(health),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @get("/health")
    async def health() -> Response[bytes]:
        return Response(b'{"status":"ok"}', media_type=MediaType.JSON)

    app = Litestar(
        route_handlers=[list_models, get_model, providers, stats, metrics, health],
        exception_handlers={
            GatewayError: _gateway_error,
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
    return App(app, gateway)


def _error_response(
    request: Request, status: int, body: bytes, headers: dict[str, str] | None = None
) -> Response[bytes]:
    headers = {**(headers or {}), "x-request-id": _request_id(request)}
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _gateway_error(request: Request, exc: Exception) -> Response[bytes]:
    assert isinstance(exc, GatewayError)
    status, headers, body = error_response(exc)
    return _error_response(request, status, body, headers)


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
