"""OpenAI's Responses API on the wire (`POST /v1/responses`): the request fields the gateway
reads, and the `response` object and stream events it writes.

Request Structs are lenient (unknown fields ignored, optional fields `UNSET`); the
response and its items have every field OpenAI's published schema requires, in its order.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

# ---- the request -------------------------------------------------------------------------


class InputPart(msgspec.Struct):
    type: str  # input_text | input_image | output_text | refusal | input_file
    text: str | None = None
    refusal: str | None = None
    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputItem(msgspec.Struct):
    type: str | None = None  # message (or absent) | function_call | function_call_output | ...
    role: str | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    id: str | None = None


class ToolParam(msgspec.Struct):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FormatParam(msgspec.Struct):
    type: str  # text | json_object | json_schema
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextParam(msgspec.Struct):
    format: FormatParam | None = None


class ResponsesRequest(msgspec.Struct):
    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextParam | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None


# ---- the response ------------------------------------------------------------------------


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class MessageItem(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    id: str
    status: str = "completed"
    role: str = "assistant"
    content: list[OutputText] = []


class FunctionCallItem(msgspec.Struct, tag="function_call", tag_field="type", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: str = "completed"


OutputItem = MessageItem | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseError(msgspec.Struct):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct):
    reason: str


class Format(msgspec.Struct):
    type: str = "text"
    name: str | UnsetType = UNSET
    schema: dict[str, Any] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    strict: bool | UnsetType = UNSET


class TextConfig(msgspec.Struct):
    format: Format = msgspec.field(default_factory=Format)


class FunctionTool(msgspec.Struct, tag="function", tag_field="type", kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Response(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: str = "in_progress"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: None = None
    store: bool = False
    temperature: float | None = None
    text: TextConfig = msgspec.field(default_factory=TextConfig)
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[FunctionTool] = []
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | UnsetType = UNSET
    user: str | UnsetType = UNSET
    metadata: dict[str, str] = {}


# ---- stream events (each carries `sequence_number`; see responses_stream.py) ---------------

_Seq = int


class _Event(msgspec.Struct, tag_field="type", kw_only=True):
    sequence_number: _Seq = 0


class Created(_Event, tag="response.created"):
    response: Response


class InProgress(_Event, tag="response.in_progress"):
    response: Response


class Completed(_Event, tag="response.completed"):
    response: Response


class Incomplete(_Event, tag="response.incomplete"):
    response: Response


class Failed(_Event, tag="response.failed"):
    response: Response


class ItemAdded(_Event, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class ItemDone(_Event, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class PartAdded(_Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class PartDone(_Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDelta(_Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDone(_Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ArgumentsDelta(_Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(_Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event, tag="error"):
    code: str | None
    message: str
    param: str | None = None


StreamEvent = (
    Created
    | InProgress
    | Completed
    | Incomplete
    | Failed
    | ItemAdded
    | ItemDone
    | PartAdded
    | PartDone
    | TextDelta
    | TextDone
    | ArgumentsDelta
    | ArgumentsDone
    | ErrorEvent
)

_encode = msgspec.json.Encoder().encode


def frame(event: StreamEvent) -> bytes:
    """One server-sent event as OpenAI writes it: `event: <type>` then its JSON."""
    name = type(event).__struct_config__.tag
    assert isinstance(name, str)
    return b"event: " + name.encode() + b"\ndata: " + _encode(event) + b"\n\n"


def encode(obj: Any) -> bytes:
    return _encode(obj)
