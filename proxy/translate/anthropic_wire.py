"""Anthropic's Messages API on the wire (https://docs.anthropic.com/en/api/messages).

The same Structs read a client's request (inbound) and write the gateway's request to an
Anthropic upstream (outbound): optional fields default to `UNSET`, so what is not set is
left out of the JSON. `Block` is every content block in one lenient shape (text, image,
tool_use, tool_result, thinking); `Event` reads every streaming event. The events the
gateway writes have one Struct each (tagged on `type`), so their JSON is exactly the
documented shape, keys in the documented order.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

Opt = UnsetType  # brevity in the field lists below


class Source(msgspec.Struct):
    type: str  # "base64" or "url"
    media_type: str | None | Opt = UNSET
    data: str | None | Opt = UNSET
    url: str | None | Opt = UNSET


class Block(msgspec.Struct):
    type: str
    text: str | None | Opt = UNSET
    source: Source | None | Opt = UNSET
    id: str | None | Opt = UNSET
    name: str | None | Opt = UNSET
    input: Any | Opt = UNSET
    tool_use_id: str | None | Opt = UNSET
    content: str | list[Block] | None | Opt = UNSET
    is_error: bool | None | Opt = UNSET
    thinking: str | None | Opt = UNSET
    signature: str | None | Opt = UNSET


class InMessage(msgspec.Struct):
    role: str
    content: str | list[Block]


class ToolSpec(msgspec.Struct):
    name: str
    description: str | None | Opt = UNSET
    input_schema: dict[str, Any] | None | Opt = UNSET
    type: str | None | Opt = UNSET  # "custom" (or absent); anything else is a server tool


class ToolChoice(msgspec.Struct):
    type: str  # auto | any | tool | none
    name: str | None | Opt = UNSET
    disable_parallel_tool_use: bool | None | Opt = UNSET


class Metadata(msgspec.Struct):
    user_id: str | None | Opt = UNSET


class MessagesRequest(msgspec.Struct):
    model: str
    messages: list[InMessage]
    max_tokens: int
    system: str | list[Block] | None | Opt = UNSET
    stop_sequences: list[str] | None | Opt = UNSET
    stream: bool | None | Opt = UNSET
    temperature: float | None | Opt = UNSET
    top_p: float | None | Opt = UNSET
    top_k: int | None | Opt = UNSET
    tools: list[ToolSpec] | None | Opt = UNSET
    tool_choice: ToolChoice | None | Opt = UNSET
    metadata: Metadata | None | Opt = UNSET


class CountTokensRequest(msgspec.Struct):
    model: str
    messages: list[InMessage]
    system: str | list[Block] | None | Opt = UNSET
    tools: list[ToolSpec] | None | Opt = UNSET


class Usage(msgspec.Struct):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int | None | Opt = UNSET
    cache_creation_input_tokens: int | None | Opt = UNSET


class Message(msgspec.Struct, kw_only=True):
    """A whole answer (`"type": "message"`), written inbound and read outbound."""

    id: str
    type: str = "message"
    role: str = "assistant"
    model: str = ""
    content: list[Block] = []
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage = msgspec.field(default_factory=Usage)


class ErrorInfo(msgspec.Struct):
    type: str = "api_error"
    message: str = ""


class ErrorBody(msgspec.Struct, tag="error", tag_field="type"):
    error: ErrorInfo


# ---- streaming: what we read (outbound) ----------------------------------------------------


class Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None


class EventUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class Event(msgspec.Struct):
    type: str
    message: Message | None = None
    index: int = 0
    content_block: Block | None = None
    delta: Delta | None = None
    usage: EventUsage | None = None
    error: ErrorInfo | None = None


# ---- streaming: what we write (inbound) ----------------------------------------------------


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type"):
    message: Message


class BlockStart(msgspec.Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: Block


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    text: str


class JsonDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class BlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | JsonDelta


class BlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    index: int


class StopDelta(msgspec.Struct):
    stop_reason: str | None
    stop_sequence: str | None = None


class DeltaUsage(msgspec.Struct):
    output_tokens: int
    input_tokens: int | Opt = UNSET


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type"):
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type"):
    pass


class Ping(msgspec.Struct, tag="ping", tag_field="type"):
    pass


OutEvent = MessageStart | BlockStart | BlockDelta | BlockStop | MessageDelta | MessageStop | Ping

_encode = msgspec.json.Encoder().encode
_NAMES = {
    MessageStart: b"message_start",
    BlockStart: b"content_block_start",
    BlockDelta: b"content_block_delta",
    BlockStop: b"content_block_stop",
    MessageDelta: b"message_delta",
    MessageStop: b"message_stop",
    Ping: b"ping",
    ErrorBody: b"error",
}


def frame(event: OutEvent | ErrorBody) -> bytes:
    """One server-sent event as Anthropic writes it: `event: <type>` then its JSON."""
    return b"event: " + _NAMES[type(event)] + b"\ndata: " + _encode(event) + b"\n\n"


def encode(obj: Any) -> bytes:
    return _encode(obj)
