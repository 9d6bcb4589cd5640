"""Outbound: Anthropic's answers as OpenAI chat completions (the `anthropic` provider).

A `message` becomes a `chat.completion`: text blocks joined into `content`, `tool_use`
blocks -> `tool_calls` (the block id as the call id, `input` as a JSON string), thinking
blocks dropped; `stop_reason` end_turn / stop_sequence / pause_turn -> `stop`,
max_tokens / model_context_window_exceeded -> `length`, tool_use -> `tool_calls`,
refusal -> `content_filter`; usage -> prompt tokens (input + cache read + cache write) and
completion tokens.

`ChunkMaker` turns the event stream into `chat.completion.chunk` payloads: message_start ->
the role chunk; text deltas -> content; a tool_use block -> a tool call (id, name) then
its `input_json_delta`s as argument pieces; message_delta -> the finish chunk; message_stop
-> the usage chunk (when asked for) and the end. A matched stop sequence is named in the
choice's `stop_reason` (vLLM's field), so the inbound Anthropic route can say
`stop_sequence` again. An `error` event raises: overloaded and
api errors are `server_error` (the chain falls back while nothing was sent).
"""

from __future__ import annotations

import msgspec

from ..errors import UpstreamError
from ..wire import (
    ChatCompletion,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    DeltaToolCall,
    OutFunction,
    OutMessage,
    OutToolCall,
    Usage,
    completion_id,
    now,
)
from . import anthropic_wire as aw

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_message = msgspec.json.Decoder(aw.Message)


class StopChoice(Choice):
    """A choice that names the stop sequence that ended it, as vLLM does (`stop_reason`):
    an Anthropic client served by an Anthropic upstream gets its `stop_sequence` back."""

    stop_reason: str | msgspec.UnsetType = msgspec.UNSET


class StopChunkChoice(ChunkChoice):
    stop_reason: str | msgspec.UnsetType = msgspec.UNSET


_event = msgspec.json.Decoder(aw.Event)
_encode = msgspec.json.Encoder().encode


def finish_reason(stop_reason: str | None) -> str:
    return _FINISH.get(stop_reason or "end_turn", "stop")


def usage(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0
) -> Usage:
    prompt = input_tokens + cache_read + cache_write
    return Usage(
        prompt_tokens=prompt, completion_tokens=output_tokens, total_tokens=prompt + output_tokens
    )


def _cached(u: aw.Usage) -> tuple[int, int]:
    read = u.cache_read_input_tokens if isinstance(u.cache_read_input_tokens, int) else 0
    write = u.cache_creation_input_tokens if isinstance(u.cache_creation_input_tokens, int) else 0
    return read, write


def decode_message(body: bytes) -> aw.Message:
    try:
        message = _message.decode(body)
    except msgspec.DecodeError:
        raise UpstreamError(
            "bad_response", "Anthropic answered 200 with a body that is not a message"
        ) from None
    if message.type != "message":
        raise UpstreamError(
            "bad_response", f"Anthropic answered 200 with a '{message.type}' object"
        )
    return message


def to_completion(message: aw.Message, model: str) -> ChatCompletion:
    texts: list[str] = []
    calls: list[OutToolCall] = []
    for b in message.content:
        if b.type == "text" and isinstance(b.text, str):
            texts.append(b.text)
        elif b.type == "tool_use":
            arguments = _encode(b.input if b.input is not msgspec.UNSET else {}).decode()
            calls.append(
                OutToolCall(id=str(b.id or ""), function=OutFunction(str(b.name or ""), arguments))
            )
    out = OutMessage(content="".join(texts) if texts or not calls else None)
    if calls:
        out.tool_calls = calls
    read, write = _cached(message.usage)
    return ChatCompletion(
        id=completion_id(),
        created=now(),
        model=message.model or model,
        choices=[
            StopChoice(
                index=0,
                message=out,
                finish_reason=finish_reason(message.stop_reason),
                stop_reason=message.stop_sequence or msgspec.UNSET,
            )
        ],
        usage=usage(message.usage.input_tokens, message.usage.output_tokens, read, write),
    )


def event_error(error: aw.ErrorInfo | None) -> UpstreamError:
    info = error or aw.ErrorInfo()
    reason = "rate_limited" if info.type == "rate_limit_error" else "server_error"
    return UpstreamError(reason, f"Anthropic error event ({info.type}): {info.message}")


class ChunkMaker:
    """Anthropic stream events in, chat chunk payloads out; `done` once message_stop came."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self._id = completion_id()
        self._created = now()
        self._model = model
        self._include_usage = include_usage
        self._tools: dict[int, int] = {}  # block index -> tool call index
        self._input = (0, 0, 0)  # input, cache read, cache write tokens
        self._output = 0
        self.done = False

    def _chunk(self, delta: Delta, finish: str | None = None, stop: str | None = None) -> bytes:
        choice = StopChunkChoice(
            index=0, delta=delta, finish_reason=finish, stop_reason=stop or msgspec.UNSET
        )
        return _encode(
            Chunk(id=self._id, created=self._created, model=self._model, choices=[choice])
        )

    def empty(self) -> bytes:
        """A chunk without choices (it carries nothing of its own)."""
        return _encode(Chunk(id=self._id, created=self._created, model=self._model, choices=[]))

    def feed(self, data: bytes) -> list[bytes]:
        try:
            event = _event.decode(data)
        except msgspec.DecodeError:
            raise UpstreamError(
                "bad_response", "Anthropic sent an event that is not JSON"
            ) from None
        kind = event.type
        if kind == "message_start" and event.message is not None:
            message = event.message
            self._model = message.model or self._model
            read, write = _cached(message.usage)
            self._input = (message.usage.input_tokens, read, write)
            self._output = message.usage.output_tokens
            return [self._chunk(Delta(role="assistant", content=""))]
        if kind == "content_block_start" and event.content_block is not None:
            return self._block_start(event.index, event.content_block)
        if kind == "content_block_delta" and event.delta is not None:
            return self._block_delta(event.index, event.delta)
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "message_stop":
            self.done = True
            if not self._include_usage:
                return []
            u = usage(self._input[0], self._output, self._input[1], self._input[2])
            return [_encode(Chunk(self._id, self._created, self._model, choices=[], usage=u))]
        if kind == "error":
            raise event_error(event.error)
        return []  # ping, content_block_stop, and event types added later

    def _block_start(self, index: int, block: aw.Block) -> list[bytes]:
        if block.type == "text" and block.text:
            return [self._chunk(Delta(content=str(block.text)))]
        if block.type != "tool_use":
            return []
        n = self._tools[index] = len(self._tools)
        function = {"name": str(block.name or ""), "arguments": ""}
        call = DeltaToolCall(index=n, id=str(block.id or ""), type="function", function=function)
        return [self._chunk(Delta(tool_calls=[call]))]

    def _block_delta(self, index: int, delta: aw.Delta) -> list[bytes]:
        if delta.type == "text_delta" and delta.text:
            return [self._chunk(Delta(content=delta.text))]
        if delta.type == "input_json_delta" and delta.partial_json and index in self._tools:
            call = DeltaToolCall(
                index=self._tools[index], function={"arguments": delta.partial_json}
            )
            return [self._chunk(Delta(tool_calls=[call]))]
        return []  # thinking and signature deltas

    def _message_delta(self, event: aw.Event) -> list[bytes]:
        if event.usage is not None:
            if event.usage.output_tokens is not None:
                self._output = event.usage.output_tokens
            if event.usage.input_tokens is not None:
                self._input = (event.usage.input_tokens, *self._input[1:])
        reason = event.delta.stop_reason if event.delta else None
        sequence = event.delta.stop_sequence if event.delta else None
        return [self._chunk(Delta(), finish_reason(reason), sequence)]
