"""Routes that serve an OpenAI-shaped request from a chain as it is: chat completions
(and, with their own request classes, legacy completions and embeddings).

`serve` runs the engine and turns its answer into a reply: the body with the
`x-omnimind-*` headers, or the chunks as SSE (`data: ...`), the stream's cost as a
comment before `[DONE]` (clients ignore comments; it is known only at the end).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .engine import Info
from .pipeline import Context, JsonReply, Reply, StreamReply
from .providers import Op
from .streaming import Answer, OwnedStream
from .wire import ApiRequest, ChatRequest

_DONE = b"data: [DONE]\n\n"


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


async def serve(ctx: Context, request: ApiRequest, op: Op) -> Reply:
    engine = ctx.gateway.engine
    if request.stream:
        answer = await engine.stream(request, op, info(ctx))
        stream = answer.stream
        assert stream is not None
        return StreamReply(_sse(stream), answer_headers(answer), ctx.error_frame, stream.aclose)
    answer = await engine.complete(request, op, info(ctx))
    return JsonReply(answer.body, answer_headers(answer))


async def _sse(stream: OwnedStream) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield b"data: %b\n\n" % chunk
    if stream.cost_usd is not None:
        yield b": x-omnimind-cost-usd: %.8f\n\n%b" % (stream.cost_usd, _DONE)
    else:
        yield _DONE


async def chat(ctx: Context) -> Reply:
    return await serve(ctx, ChatRequest(ctx.body), Op.CHAT)
