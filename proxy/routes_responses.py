"""`POST /v1/responses`: OpenAI's Responses API, served by translating to chat completions.

A request becomes a chat request for its alias (`translate/responses.py`) and is served by
the same engine as chat completions; the answer comes back as a `response` object or as
the Responses event stream (`translate/responses_stream.py`), which ends with
`response.failed` if the chain fails after it started. Unless `"store": false`, each
finished response is kept in the gateway's bounded store (`translate/responses_store.py`)
so that `previous_response_id` can continue it; an id the store does not have (never
stored, forgotten, or another key's) is a 400, never silently ignored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from .errors import GatewayError, InvalidRequest
from .pipeline import Context, JsonReply, Reply, StreamReply
from .providers import Op
from .routes_chat import tracked
from .streaming import OwnedStream
from .translate import responses_wire as rw
from .translate.chat import ChatMessage, completion_decoder
from .translate.responses import (
    check_supported,
    decode_request,
    input_messages,
    output_messages,
    skeleton,
    to_chat,
    to_response,
)
from .translate.responses_store import ResponseStore
from .translate.responses_stream import ResponsesStream
from .wire import ChatRequest

Keep = Callable[[rw.Response], None]


async def create(ctx: Context) -> Reply:
    req = decode_request(ctx.body)
    check_supported(req)
    store: ResponseStore = ctx.gateway.responses
    history = _history(req, store, ctx.key_id)
    chat = ChatRequest(rw.encode(to_chat(req, history)))
    response = skeleton(req)
    conversation = history + input_messages(req)

    def keep(done: rw.Response) -> None:
        if req.store is not False and done.status != "failed":
            store.put(done.id, ctx.key_id, conversation + output_messages(done))

    t = await tracked(ctx, chat, Op.CHAT)  # the engine, inside a state turn (tokens, health)
    answer = t.answer
    if chat.stream:
        stream = answer.stream
        assert stream is not None
        translator = ResponsesStream(response)

        def failed(exc: GatewayError) -> bytes:
            code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
            return translator.fail(ctx.gateway.redact(exc.message), code)

        frames = _frames(stream, translator, keep)
        return StreamReply(frames, t.headers, failed, t.close)
    done = to_response(completion_decoder.decode(answer.body), response)
    keep(done)
    return JsonReply(rw.encode(done), t.headers)


def _history(req: rw.ResponsesRequest, store: ResponseStore, key_id: str) -> list[ChatMessage]:
    if req.previous_response_id is None:
        return []
    found = store.get(req.previous_response_id, key_id)
    if found is None:
        raise InvalidRequest(
            f"Previous response with id '{req.previous_response_id[:100]}' not found "
            f"(this gateway keeps the last {store.max_responses} responses, in memory).",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return found


async def _frames(
    stream: OwnedStream, translator: ResponsesStream, keep: Keep
) -> AsyncIterator[bytes]:
    for frame in translator.start():
        yield frame
    async for payload in stream:
        for frame in translator.feed(payload):
            yield frame
    if stream.cost_usd is not None:  # a comment: clients skip it
        yield b": x-omnimind-cost-usd: %.8f\n\n" % stream.cost_usd
    closing = translator.finish()
    keep(translator.response)
    for frame in closing:
        yield frame
