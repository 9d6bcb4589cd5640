"""Chat completion chunks as Anthropic's streaming events, exactly as Anthropic documents them.

    message_start                     with the first chunk (input tokens not known yet: 0)
    ping                              right after it, as Anthropic does
    content_block_start               a text block, or a tool_use block per tool call
    content_block_delta               text_delta / input_json_delta
    content_block_stop                when the next block starts, or at the finish
    message_delta                     stop_reason, and usage (output and input tokens)
    message_stop

`feed(payload)` takes one `chat.completion.chunk` (JSON bytes, without `data: `) and
returns the frames it makes; `finish()` returns the closing frames once the upstream
stream ended (usage comes in a chunk after the finish reason, so the message_delta waits
for the end); `error_frame(status, message)` is the `error` event for a failure after
the stream started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from . import anthropic_wire as aw
from .anthropic import error_type, message_id, stop_reason
from .chat import ChoiceView, FunctionView, UsageView, completion_decoder


class AnthropicStream:
    def __init__(self, model: str, stops: list[str] | None = None) -> None:
        self._model = model
        self._stops = stops
        self._started = False
        self._index = -1  # the open block's index, -1: none open
        self._open: str | None = None  # "text" or "tool_use"
        self._tools: dict[int, int] = {}  # chat tool call index -> block index
        self._choice: ChoiceView | None = None  # the one with the finish reason
        self._usage: UsageView | None = None
        self._blocks = 0

    def feed(self, payload: bytes) -> list[bytes]:
        try:
            chunk = completion_decoder.decode(payload)
        except msgspec.DecodeError:
            return []  # providers check chunks; a stray one is not worth failing for
        out: list[bytes] = []
        if not self._started:
            out += self._start(chunk.id, chunk.model)
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices[:1]:
            delta = choice.delta
            if delta is not None:
                text = delta.content or delta.refusal
                if text:
                    out += self._text(text)
                for call in delta.tool_calls or []:
                    out += self._tool_call(call.index, call.id, call.function)
            if choice.finish_reason:
                self._choice = choice
        return out

    def finish(self) -> list[bytes]:
        out = [] if self._started else self._start("", self._model)
        out += self._close_block()
        reason, sequence = stop_reason(self._choice or ChoiceView(), self._stops)
        usage = self._usage
        delta_usage = aw.DeltaUsage(output_tokens=(usage.completion_tokens or 0) if usage else 0)
        if usage is not None:
            delta_usage.input_tokens = usage.prompt_tokens or 0
        out.append(aw.frame(aw.MessageDelta(aw.StopDelta(reason, sequence), delta_usage)))
        out.append(aw.frame(aw.MessageStop()))
        return out

    def _start(self, chat_id: str, model: str) -> list[bytes]:
        self._started = True
        message = aw.Message(id=message_id(chat_id), model=model or self._model)
        message.usage = aw.Usage(input_tokens=0, output_tokens=0)
        return [aw.frame(aw.MessageStart(message)), aw.frame(aw.Ping())]

    def _text(self, text: str) -> list[bytes]:
        out = []
        if self._open != "text":
            out += self._close_block()
            out.append(self._open_block(aw.Block(type="text", text=""), "text"))
        out.append(aw.frame(aw.BlockDelta(self._index, aw.TextDelta(text))))
        return out

    def _tool_call(
        self, index: int, call_id: str | None, function: FunctionView | None
    ) -> list[bytes]:
        out = []
        name = function.name if function else None
        arguments = function.arguments if function else None
        if index not in self._tools:
            out += self._close_block()
            block = aw.Block(
                type="tool_use", id=call_id or f"toolu_{index}", name=name or "", input={}
            )
            out.append(self._open_block(block, "tool_use"))
            self._tools[index] = self._index
        if arguments:
            at = self._tools[index]
            if at != self._index:  # Anthropic cannot reopen a closed block: no upstream
                return out  # we know interleaves its calls' argument pieces
            out.append(aw.frame(aw.BlockDelta(at, aw.JsonDelta(arguments))))
        return out

    def _open_block(self, block: aw.Block, kind: str) -> bytes:
        self._index = self._blocks
        self._blocks += 1
        self._open = kind
        return aw.frame(aw.BlockStart(self._index, block))

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [aw.frame(aw.BlockStop(self._index))]


def error_frame(status: int, message: str) -> bytes:
    """The `error` event for a stream that fails after it started."""
    return aw.frame(aw.ErrorBody(aw.ErrorInfo(error_type(status), message)))


async def anthropic_frames(
    chunks: AsyncIterator[bytes], model: str, stops: list[str] | None = None
) -> AsyncIterator[bytes]:
    """The Anthropic frames of a chat chunk stream, ending with message_stop."""
    translator = AnthropicStream(model, stops)
    async for payload in chunks:
        for frame in translator.feed(payload):
            yield frame
    for frame in translator.finish():
        yield frame
