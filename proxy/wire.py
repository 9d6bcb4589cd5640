"""OpenAI chat wire format: the narrow request view we route on, and typed responses.

The gateway never re-encodes a client body field by field: `ChatRequest` keeps every
top-level field as `msgspec.Raw` (undecoded bytes) and only rewrites `model`. Adapters
that translate (Ollama, HuggingFace) decode the typed `ChatBody` and build responses
from the Structs below, so every local answer has OpenAI's exact shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

import msgspec

from .errors import InvalidRequest

Raw = msgspec.Raw
_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_str_decoder = msgspec.json.Decoder(str)
_int_decoder = msgspec.json.Decoder(int | None)
_encode = msgspec.json.Encoder().encode


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class ApiRequest:
    """A client's request body: its top-level fields untouched, plus what routing needs.

    `model` and `stream` are read here; each API's subclass checks its own required field.
    """

    __slots__ = ("fields", "model", "stream", "include_usage", "_raw")
    required: ClassVar[str | None] = None  # the field this API cannot do without

    def __init__(self, raw: bytes | None = None, fields: dict[str, Raw] | None = None) -> None:
        self._raw = raw
        if fields is None:
            try:
                fields = _fields_decoder.decode(raw or b"")
            except msgspec.DecodeError:
                raise InvalidRequest(
                    "We could not parse the JSON body of your request. "
                    "The body must be a JSON object."
                ) from None
        self.fields = fields
        model = fields.get("model")
        if model is None:
            raise InvalidRequest("You must provide a model parameter.", param="model")
        try:
            self.model: str = _str_decoder.decode(model)
        except msgspec.DecodeError:
            raise InvalidRequest("'model' must be a string.", param="model") from None
        self.check()
        self.stream = _flag(fields.get("stream"), "stream")
        self.include_usage = False
        options = fields.get("stream_options")
        if options is not None and bytes(options).strip() != b"null":
            try:
                so = msgspec.json.decode(options, type=StreamOptions)
            except msgspec.DecodeError:
                raise InvalidRequest(
                    "'stream_options' must be an object.", param="stream_options"
                ) from None
            self.include_usage = bool(so.include_usage)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Any:
        """A request built in-process (the Python API, translated APIs): no body to parse."""
        return cls(fields={k: msgspec.Raw(_encode(v)) for k, v in obj.items()})

    def check(self) -> None:
        name = self.required
        if name is not None and name not in self.fields:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name)

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = _encode(self.fields)
        return self._raw

    def max_tokens(self) -> int | None:
        """The answer's token budget, if the client set one."""
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            raw = self.fields.get(name)
            if raw is not None:
                try:
                    value = _int_decoder.decode(raw)
                except msgspec.DecodeError:
                    return None
                return value if isinstance(value, int) and value > 0 else None
        return None

    def body_for(self, model: str) -> bytes:
        """The client's body with `model` replaced by the upstream model; nothing else changes."""
        fields = dict(self.fields)
        fields["model"] = msgspec.Raw(_encode(model))
        return _encode(fields)

    def decode(self, type_: type[Any]) -> Any:
        """A typed view of the whole body, for adapters that translate it."""
        try:
            return msgspec.json.decode(self.raw, type=type_)
        except msgspec.ValidationError as exc:
            what, _, where = str(exc).rpartition(" - at ")
            param = where.strip("`").removeprefix("$").lstrip(".") or None
            raise InvalidRequest(f"Invalid request: {what or exc}", param=param) from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"Invalid request: {exc}") from None


class ChatRequest(ApiRequest):
    """`POST /v1/chat/completions`."""

    __slots__ = ()
    required = "messages"

    def check(self) -> None:
        super().check()
        if not bytes(self.fields["messages"]).lstrip().startswith(b"["):
            raise InvalidRequest("'messages' must be an array.", param="messages")


def _flag(raw: msgspec.Raw | None, name: str) -> bool:
    if raw is None:
        return False
    value = bytes(raw).strip()
    if value in (b"false", b"null"):
        return False
    if value == b"true":
        return True
    raise InvalidRequest(f"'{name}' must be a boolean.", param=name)


# ---- typed request body (for translating adapters) --------------------------------------


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct):
    function: FunctionCall
    id: str = ""
    type: str = "function"


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The text of the message, content parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: dict[str, Any] | None = None


class ChatBody(msgspec.Struct):
    model: str
    messages: list[Message]
    stream: bool | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    n: int | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- typed responses (built by translating adapters) -------------------------------------


class Usage(msgspec.Struct, omit_defaults=False):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class OutFunction(msgspec.Struct):
    name: str
    arguments: str


class OutToolCall(msgspec.Struct):
    id: str
    function: OutFunction
    type: str = "function"


class DeltaToolCall(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: dict[str, str] | None = None


class OutMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    refusal: None = None
    tool_calls: list[OutToolCall] | msgspec.UnsetType = msgspec.UNSET  # omitted when unset


class Choice(msgspec.Struct):
    index: int
    message: OutMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | msgspec.UnsetType = msgspec.UNSET


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class Chunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None


class UsageView(msgspec.Struct):
    """The narrow view of an upstream answer we check and account from."""

    usage: Usage | None = None
    choices: msgspec.Raw = msgspec.Raw(b"")  # empty: absent
    data: msgspec.Raw = msgspec.Raw(b"")  # embeddings
    error: msgspec.Raw = msgspec.Raw(b"")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


encode = _encode
