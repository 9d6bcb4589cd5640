"""The chat-completions side of every translation: the request we build, the answers we read.

Requests built here go to the gateway's chain as OpenAI chat bodies, so every field is
one OpenAI documents; optional fields are `UNSET` (left out of the JSON, never `null`).
Answers come back as whatever an upstream sent (already checked to be JSON with
`choices`), so the views below are lenient: missing fields default, unknown ones are
ignored.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from ..errors import InvalidRequest

T = TypeVar("T")

# ---- the chat request we build --------------------------------------------------------


class ImageURL(msgspec.Struct):
    url: str
    detail: str | UnsetType = UNSET


class Part(msgspec.Struct):
    type: str
    text: str | UnsetType = UNSET
    image_url: ImageURL | UnsetType = UNSET


def text_part(text: str) -> Part:
    return Part(type="text", text=text)


def image_part(url: str, detail: str | None = None) -> Part:
    return Part(type="image_url", image_url=ImageURL(url, detail if detail else UNSET))


class Function(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    function: Function
    type: str = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[Part] | None | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET


class FunctionDef(msgspec.Struct):
    name: str
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET
    strict: bool | UnsetType = UNSET


class Tool(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class StreamOptions(msgspec.Struct):
    include_usage: bool = True


class ChatRequest(msgspec.Struct):
    """An OpenAI chat request, only the fields a translation sets."""

    model: str
    messages: list[ChatMessage]
    stream: bool | UnsetType = UNSET
    stream_options: StreamOptions | UnsetType = UNSET
    max_tokens: int | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    stop: list[str] | UnsetType = UNSET
    tools: list[Tool] | UnsetType = UNSET
    tool_choice: str | dict[str, Any] | UnsetType = UNSET
    parallel_tool_calls: bool | UnsetType = UNSET
    response_format: dict[str, Any] | UnsetType = UNSET
    user: str | UnsetType = UNSET

    def streaming(self) -> ChatRequest:
        """The same request asking for a stream with usage in its last chunk."""
        return msgspec.structs.replace(self, stream=True, stream_options=StreamOptions())


def function_choice(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def no_parameters() -> dict[str, Any]:
    """The JSON schema of a function that takes no arguments."""
    return {"type": "object", "properties": {}}


# ---- the answers we read ---------------------------------------------------------------


class FunctionView(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class ToolCallView(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: FunctionView | None = None


class MessageView(msgspec.Struct):
    """A `message` (whole answer) or a `delta` (one chunk)."""

    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallView] | None = None


class ChoiceView(msgspec.Struct):
    index: int = 0
    message: MessageView | None = None
    delta: MessageView | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string that ended the answer


class TokenDetails(msgspec.Struct):
    cached_tokens: int | None = None


class UsageView(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    total_tokens: int | None = None
    prompt_tokens_details: TokenDetails | None = None

    @property
    def cached(self) -> int:
        details = self.prompt_tokens_details
        return (details.cached_tokens or 0) if details else 0


class CompletionView(msgspec.Struct):
    """A `chat.completion` or a `chat.completion.chunk`."""

    id: str = ""
    model: str = ""
    created: int = 0
    choices: list[ChoiceView] = []
    usage: UsageView | None = None


completion_decoder = msgspec.json.Decoder(CompletionView)
encode = msgspec.json.Encoder().encode


def decode_body(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """A client's body as a typed request; a wrong shape is a 400 naming the field."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        what, _, where = str(exc).rpartition(" - at ")
        param = where.strip("`").removeprefix("$").lstrip(".") or None
        raise InvalidRequest(f"Invalid request: {what or exc}", param=param) from None
    except msgspec.DecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"
