"""Routes that serve an OpenAI-shaped request from a chain as it is: chat completions
(and, with their own request classes, legacy completions and embeddings).

`serve` runs the engine and turns its answer into a reply: the body with the
`x-omnimind-*` headers, or the chunks as SSE (`data: ...`), the stream's cost as a
comment before `[DONE]` (clients ignore comments; it is known only at the end).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import msgspec

from .cache import Assembler
from .engine import Info
from .observe import RequestRecord
from .pipeline import Context, JsonReply, Reply, StreamReply
from .providers import Op
from .state import flow
from .streaming import Answer, OwnedStream
from .wire import ApiRequest, ChatRequest

_DONE = b"data: [DONE]\n\n"
_CACHED_OPS = (Op.CHAT, Op.EMBEDDING)  # a streamed completion could not be replayed


def answer_headers(answer: Answer) -> dict[str, str]:
    headers = {
        "x-omnimind-provider": answer.provider,
        "x-omnimind-model": answer.model,
        "x-omnimind-latency-ms": str(round(answer.latency_ms)),
        "x-omnimind-attempts": str(len(answer.attempts) + 1),
    }
    if answer.attempts:
        headers["x-omnimind-fallbacks"] = ",".join(
            f"{a.provider}:{a.reason}" for a in answer.attempts
        )
    if answer.cost_usd is not None:
        headers["x-omnimind-cost-usd"] = f"{answer.cost_usd:.8f}"
    return headers


def info(ctx: Context) -> Info:
    return Info(ctx.request_id, ctx.prefer, ctx.key_id)


async def begin_turn(ctx: Context, request: ApiRequest, op: Op, cache: bool = True) -> flow.Turn:
    """The request's turn with the state (limits unless the pipeline checked them, the
    chain's shared health, the cache): settle it with `turn.done(usage, cost)` or
    `turn.failed()`. For routes that call the engine themselves, with `cache=False`."""
    gateway = ctx.gateway
    engine = gateway.engine
    # An unknown alias is still admitted (limits), then refused and recorded by the engine.
    known = request.model in engine.config.models
    alias = request.model if known else ""
    caller = ctx.caller or gateway.guard.identify(ctx.headers, ctx.client)
    spec = engine.config.caches.get(request.model) if cache and op in _CACHED_OPS else None
    if flow.nothing_to_ask(gateway.guard, caller, spec, limits=not ctx.admitted):
        return flow.plain(gateway.guard, caller, alias)
    entries = engine.chain(request.model, ctx.prefer) if known else ()
    return await flow.begin(
        gateway.guard, caller, alias, flow.pairs(entries),
        {name: held.health for name, held in engine.pool.held.items()},
        spec, request.fields, op, ctx.headers.get("cache-control"), limits=not ctx.admitted,
    )  # fmt: skip


class Tracked(msgspec.Struct):
    """An engine answer with its state turn: `headers` to send, `close` for a stream's
    StreamReply (it settles the turn once the stream is done), `assembler` to feed."""

    answer: Answer
    headers: dict[str, str]
    close: Callable[[], Awaitable[None]]
    assembler: Assembler | None = None


async def tracked(
    ctx: Context, request: ApiRequest, op: Op, turn: flow.Turn | None = None
) -> Tracked:
    """`engine.complete`/`engine.stream` inside a state turn (see `begin_turn`; without
    one given, a turn with no cache): what a route that translates the answer calls."""
    turn = turn or await begin_turn(ctx, request, op, cache=False)
    engine = ctx.gateway.engine
    try:
        run = engine.stream if request.stream else engine.complete
        answer = await run(request, op, info(ctx))
    except BaseException:
        turn.failed()
        raise
    headers = answer_headers(answer)
    extra = turn.headers()
    if extra:
        headers.update(extra)
    stream = answer.stream
    if stream is None:
        turn.done(answer.usage, answer.cost_usd, answer.body)
        return Tracked(answer, headers, _nothing)
    assembler = turn.assembler()
    settled = turn

    async def close() -> None:
        await stream.aclose()
        whole = assembler if stream.outcome == "ok" else None
        settled.done(stream.usage, stream.cost_usd, whole)

    return Tracked(answer, headers, close, assembler)


async def serve(ctx: Context, request: ApiRequest, op: Op) -> Reply:
    turn = await begin_turn(ctx, request, op)
    if turn.cached is not None:
        return _from_cache(ctx, request, turn)
    t = await tracked(ctx, request, op, turn)
    stream = t.answer.stream
    if stream is None:
        return JsonReply(t.answer.body, t.headers)
    if t.assembler is None:  # the payloads as they are (the relay frames them)
        return StreamReply(stream, t.headers, ctx.error_frame, t.close, partial(_end, stream))
    return StreamReply(_sse(stream, t.assembler), t.headers, ctx.error_frame, t.close)


def _from_cache(ctx: Context, request: ApiRequest, turn: flow.Turn) -> Reply:
    """A cache hit: no upstream call, no cost; recorded as such."""
    assert turn.cached is not None
    turn.hit()
    rec = RequestRecord(ctx.request_id, request.model, request.stream, outcome="cached",
                        provider="cache", model=request.model, key_id=ctx.key_id)  # fmt: skip
    ctx.gateway.observer.finished(rec)
    headers = {"x-omnimind-provider": "cache", **turn.headers()}
    if not request.stream:
        return JsonReply(turn.cached, headers)
    frames = [b"data: %b\n\n" % c for c in turn.replay(request.include_usage)]
    return StreamReply(_frames(frames), headers, ctx.error_frame, _nothing)


async def _frames(frames: list[bytes]) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame
    yield _DONE


async def _nothing() -> None:
    return None


async def _sse(stream: OwnedStream, assembler: Assembler) -> AsyncIterator[bytes]:
    """The payloads as SSE frames, each fed to the cache's assembler on its way."""
    async for chunk in stream:
        assembler.feed(chunk)
        yield b"data: %b\n\n" % chunk
    yield _end(stream)


def _end(stream: OwnedStream) -> bytes:
    """After the last payload: the stream's cost (known only now) as a comment, [DONE]."""
    if stream.cost_usd is not None:
        return b": x-omnimind-cost-usd: %.8f\n\n%b" % (stream.cost_usd, _DONE)
    return _DONE


def chat(ctx: Context) -> Awaitable[Reply]:
    return serve(ctx, ChatRequest(ctx.body), Op.CHAT)  # its coroutine: one frame less
