"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API.

A request is translated to a chat request for its alias (`translate/anthropic.py`) and
served by the same engine as chat completions (chains, fallback, health, metrics, audit,
cost); the answer comes back as Anthropic's `message`, or as its event stream
(`translate/anthropic_stream.py`); an Anthropic upstream's own answer is relayed as is
(`translate/anthropic_native.py`). Errors, before or after a stream started, are
Anthropic-shaped: the route's dialect renders them (`render.AnthropicDialect`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from .pipeline import Context, JsonReply, Reply, StreamReply
from .providers import Op
from .routes_chat import tracked
from .streaming import OwnedStream
from .tokens import estimate_prompt
from .translate import anthropic_wire as aw
from .translate.anthropic import decode_count, decode_request, to_chat, to_message
from .translate.anthropic_native import NativeChat, native_frame, native_of
from .translate.anthropic_stream import AnthropicStream
from .translate.chat import completion_decoder
from .wire import ApiRequest


async def create(ctx: Context) -> Reply:
    req = decode_request(ctx.body)
    chat = NativeChat(aw.encode(to_chat(req)), ctx.body)
    stops = req.stop_sequences if isinstance(req.stop_sequences, list) else None
    t = await tracked(ctx, chat, Op.CHAT)  # the engine, inside a state turn (tokens, health)
    answer = t.answer
    if chat.stream:
        stream = answer.stream
        assert stream is not None
        frames = _frames(stream, AnthropicStream(req.model, stops))
        return StreamReply(frames, t.headers, ctx.error_frame, t.close)
    native = native_of(answer.body)  # an Anthropic upstream's own answer, relayed as is
    if native is not None:
        return JsonReply(native, t.headers)
    message = to_message(completion_decoder.decode(answer.body), stops)
    return JsonReply(aw.encode(message), t.headers)


async def _frames(stream: OwnedStream, translator: AnthropicStream) -> AsyncIterator[bytes]:
    relayed = False  # an Anthropic upstream's own events: relayed as they are
    async for payload in stream:
        native = native_of(payload)
        if native is not None:
            relayed = True
            yield native_frame(native)
            continue
        for frame in translator.feed(payload):
            yield frame
    if stream.cost_usd is not None:  # a comment: clients skip it
        yield b": x-omnimind-cost-usd: %.8f\n\n" % stream.cost_usd
    if not relayed:
        for frame in translator.finish():
            yield frame


class _Count(msgspec.Struct):
    input_tokens: int


async def count_tokens(ctx: Context) -> Reply:
    """An estimate from the counter the context-window rule uses (`tokens.py`): system,
    messages and tool definitions."""
    req = decode_count(ctx.body)
    ctx.gateway.engine.chain(req.model)  # an unknown alias is a 404, as for /v1/messages
    return JsonReply(aw.encode(_Count(max(1, estimate_prompt(ApiRequest(ctx.body))))))
