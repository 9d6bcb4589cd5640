"""The GET routes: models, providers, stats, metrics, health and readiness."""

from __future__ import annotations

import msgspec

from .pipeline import Context, JsonReply, Reply
from .state.gauge import usage_exposition

_encode = msgspec.json.Encoder().encode
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _model(ctx: Context, alias: str) -> dict[str, object]:
    kind = ctx.gateway.config.kinds.get(alias, "chat")
    return {"id": alias, "object": "model", "created": ctx.gateway.created, "owned_by": "omnimind",
            "kind": kind}  # fmt: skip


async def list_models(ctx: Context) -> Reply:
    data = [_model(ctx, alias) for alias in ctx.gateway.config.models]
    return JsonReply(_encode({"object": "list", "data": data}))


async def get_model(ctx: Context) -> Reply:
    ctx.gateway.engine.chain(ctx.path_arg)  # 404 model_not_found if unknown
    return JsonReply(_encode(_model(ctx, ctx.path_arg)))


async def providers(ctx: Context) -> Reply:
    data = ctx.gateway.engine.provider_status()
    return JsonReply(
        ctx.gateway.redact(_encode({"object": "list", "data": data}).decode()).encode()
    )


async def stats(ctx: Context) -> Reply:
    gateway = ctx.gateway
    body = gateway.observer.stats.snapshot()
    body["providers"] = {p.id: p.available for p in gateway.engine.provider_status()}
    body["state"] = await gateway.guard.store.stats()  # usage and spend of every instance
    return JsonReply(_encode(body))


async def metrics(ctx: Context) -> Reply:
    gateway = ctx.gateway
    if gateway.config.server.metrics_auth:
        await gateway.authorize(ctx.headers, ctx.client)
    health = {p.id: p for p in gateway.engine.provider_status()}
    text = gateway.observer.metrics.exposition(health)
    store = gateway.guard.store
    if store.backend != "memory" and not store.degraded:
        text += usage_exposition(await store.stats())
    return JsonReply(gateway.redact(text.decode()).encode(), content_type=METRICS_TYPE)


async def health(ctx: Context) -> Reply:
    return JsonReply(b'{"status":"ok"}')


async def ready(ctx: Context) -> Reply:
    loaded = ctx.gateway.ready()
    status = 200 if all(loaded.values()) else 503
    store = ctx.gateway.guard.store  # degraded: serving on, without the shared state
    body = {"status": "ready" if status == 200 else "loading", "preload": loaded,
            "state": {"backend": store.backend, "degraded": store.degraded}}  # fmt: skip
    return JsonReply(_encode(body), status=status)
