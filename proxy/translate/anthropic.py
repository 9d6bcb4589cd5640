"""Inbound Anthropic Messages API: a client's `/v1/messages` request as a chat request, and
a chat completion as Anthropic's `message` (streams: `anthropic_stream.py`).

Request: `system` (string or text blocks) becomes the first `system` message; content
blocks become chat content (`text` -> text parts, `image` base64 -> a data URL, an image
`url` source -> its URL); an assistant's `tool_use` blocks become `tool_calls` (ids
kept, `input` as a JSON string); a user's `tool_result` blocks become `tool` messages
placed before the rest of that user turn (`is_error` results are prefixed `Error: `);
`thinking` blocks are dropped. `tools` become function tools; `tool_choice` auto / any /
tool / none -> "auto" / "required" / a named function / "none", and
`disable_parallel_tool_use` -> `parallel_tool_calls: false`; `max_tokens`, `temperature`,
`top_p` pass; `stop_sequences` -> `stop`; `metadata.user_id` -> `user`; `top_k` is
dropped (chat completions has no such field). A server tool (`web_search_...`) is the
client's error.

Answer: text -> one `text` block, tool calls -> `tool_use` blocks with the call ids;
`finish_reason` stop / length / tool_calls / content_filter -> `end_turn` (or
`stop_sequence` when the upstream names which stop string matched) / `max_tokens` /
`tool_use` / `refusal`; usage -> `input_tokens` / `output_tokens`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET

from ..errors import InvalidRequest
from . import anthropic_wire as aw
from .chat import (
    ChatMessage,
    ChatRequest,
    ChoiceView,
    CompletionView,
    Function,
    FunctionDef,
    Part,
    Tool,
    ToolCall,
    decode_body,
    function_choice,
    image_part,
    new_id,
    no_parameters,
    text_part,
)

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_request_decoder = msgspec.json.Decoder(aw.MessagesRequest)
_count_decoder = msgspec.json.Decoder(aw.CountTokensRequest)
_args_decoder = msgspec.json.Decoder()


def error_type(status: int) -> str:
    """Anthropic's error `type` for an HTTP status."""
    if status in _STATUS_TYPES:
        return _STATUS_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(status: int, message: str) -> bytes:
    """`{"type": "error", "error": {"type", "message"}}` for a status, as Anthropic answers."""
    return aw.encode(aw.ErrorBody(aw.ErrorInfo(error_type(status), message)))


def decode_request(body: bytes) -> aw.MessagesRequest:
    return decode_body(_request_decoder, body)


def decode_count(body: bytes) -> aw.CountTokensRequest:
    return decode_body(_count_decoder, body)


def to_chat(req: aw.MessagesRequest, model: str | None = None) -> ChatRequest:
    """A Messages request as a chat request (for `model`, the alias when not given)."""
    if req.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be greater than or equal to 1")
    messages: list[ChatMessage] = []
    system = system_text(req.system)
    if system:
        messages.append(ChatMessage(role="system", content=system))
    for m in req.messages:
        messages.extend(_messages(m))
    out = ChatRequest(model=model or req.model, messages=messages, max_tokens=req.max_tokens)
    if isinstance(req.temperature, float | int):
        out.temperature = req.temperature
    if isinstance(req.top_p, float | int):
        out.top_p = req.top_p
    if req.stop_sequences:
        out.stop = list(req.stop_sequences)
    if req.tools:
        out.tools = [_tool(t) for t in req.tools]
    if req.tool_choice and req.tools:  # without tools there is nothing to choose
        _tool_choice(req.tool_choice, out)
    if isinstance(req.metadata, aw.Metadata) and req.metadata.user_id:
        out.user = req.metadata.user_id
    return out.streaming() if req.stream else out


def system_text(system: str | list[aw.Block] | None | msgspec.UnsetType) -> str:
    if isinstance(system, str):
        return system
    if not system:
        return ""
    for b in system:
        if b.type != "text":
            raise InvalidRequest(f"system: blocks must be text blocks, got '{b.type}'")
    return "\n".join(b.text or "" for b in system if isinstance(b.text, str))


def _messages(m: aw.InMessage) -> list[ChatMessage]:
    if m.role not in ("user", "assistant"):
        raise InvalidRequest(f"messages: role must be 'user' or 'assistant', got '{m.role}'")
    if isinstance(m.content, str):
        return [ChatMessage(role=m.role, content=m.content)]
    if m.role == "assistant":
        return [_assistant(m.content)]
    out: list[ChatMessage] = []
    parts: list[Part] = []
    for b in m.content:
        if b.type == "tool_result":
            out.append(_tool_result(b, parts))
        elif b.type in ("text", "image"):
            parts.append(_part(b))
        elif b.type not in ("thinking", "redacted_thinking"):
            raise InvalidRequest(f"messages: content block type '{b.type}' is not supported")
    if parts:
        out.append(ChatMessage(role="user", content=_content(parts)))
    return out


def _assistant(blocks: list[aw.Block]) -> ChatMessage:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for b in blocks:
        if b.type == "text":
            texts.append(b.text or "")
        elif b.type == "tool_use":
            args = aw.encode(b.input if b.input is not UNSET else {}).decode()
            calls.append(
                ToolCall(id=b.id or new_id("toolu_"), function=Function(b.name or "", args))
            )
        elif b.type not in ("thinking", "redacted_thinking"):
            raise InvalidRequest(f"messages: an assistant cannot send a '{b.type}' block")
    # null content only beside tool calls: chat completions wants one or the other
    message = ChatMessage(role="assistant", content="".join(texts) if texts or not calls else None)
    if calls:
        message.tool_calls = calls
    return message


def _tool_result(b: aw.Block, images: list[Part]) -> ChatMessage:
    """A `tool` message; images in the result join the user turn that follows."""
    if isinstance(b.content, str):
        text = b.content
    else:
        texts = []
        for inner in b.content or []:
            if inner.type == "image":
                images.append(_part(inner))
            elif inner.type == "text":
                texts.append(inner.text or "")
        text = "\n".join(texts)
    if b.is_error:
        text = f"Error: {text}"
    return ChatMessage(role="tool", content=text, tool_call_id=b.tool_use_id or "")


def _part(b: aw.Block) -> Part:
    if b.type == "text":
        return text_part(b.text or "")
    source = b.source
    if not isinstance(source, aw.Source):
        raise InvalidRequest("messages: an image block needs a source")
    if source.type == "base64" and source.data and source.media_type:
        return image_part(f"data:{source.media_type};base64,{source.data}")
    if source.type == "url" and source.url:
        return image_part(source.url)
    raise InvalidRequest(f"messages: image source type '{source.type}' is not supported")


def _content(parts: list[Part]) -> str | list[Part]:
    """Text only: one string (every upstream takes it); with images: the parts."""
    if all(p.type == "text" for p in parts):
        return "\n".join(p.text for p in parts if isinstance(p.text, str))
    return parts


def _tool(t: aw.ToolSpec) -> Tool:
    if t.type not in (UNSET, None, "custom"):
        raise InvalidRequest(f"tools: server tool '{t.type}' is not supported, only custom tools")
    function = FunctionDef(name=t.name)
    if isinstance(t.description, str):
        function.description = t.description
    function.parameters = t.input_schema if isinstance(t.input_schema, dict) else no_parameters()
    return Tool(function=function)


def _tool_choice(choice: aw.ToolChoice, out: ChatRequest) -> None:
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice: type 'tool' needs a name")
        out.tool_choice = function_choice(choice.name)
    elif choice.type in _CHOICES:
        out.tool_choice = _CHOICES[choice.type]
    else:
        raise InvalidRequest(f"tool_choice: unknown type '{choice.type}'")
    if choice.disable_parallel_tool_use and out.tools is not UNSET:
        out.parallel_tool_calls = False


# ---- the answer ------------------------------------------------------------------------


def stop_reason(choice: ChoiceView, stops: list[str] | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for a chat choice."""
    matched = choice.stop_reason
    if choice.finish_reason == "stop" and isinstance(matched, str) and stops and matched in stops:
        return "stop_sequence", matched
    return _STOP_REASONS.get(choice.finish_reason or "stop", "end_turn"), None


def tool_input(arguments: str | None) -> Any:
    """A tool call's arguments as the object Anthropic's `input` is."""
    try:
        value = _args_decoder.decode(arguments or "{}")
    except msgspec.DecodeError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def to_message(view: CompletionView, stops: list[str] | None = None) -> aw.Message:
    """A chat completion as Anthropic's `message`."""
    choice = view.choices[0] if view.choices else ChoiceView()
    message = choice.message
    blocks: list[aw.Block] = []
    text = (message.content or message.refusal or "") if message else ""
    if text:
        blocks.append(aw.Block(type="text", text=text))
    for call in (message.tool_calls if message else None) or []:
        function = call.function
        blocks.append(
            aw.Block(
                type="tool_use",
                id=call.id or new_id("toolu_"),
                name=(function.name if function else None) or "",
                input=tool_input(function.arguments if function else None),
            )
        )
    if not blocks:
        blocks.append(aw.Block(type="text", text=""))
    reason, sequence = stop_reason(choice, stops)
    usage = view.usage
    return aw.Message(
        id=message_id(view.id),
        model=view.model,
        content=blocks,
        stop_reason=reason,
        stop_sequence=sequence,
        usage=aw.Usage(
            input_tokens=(usage.prompt_tokens or 0) if usage else 0,
            output_tokens=(usage.completion_tokens or 0) if usage else 0,
        ),
    )


def message_id(chat_id: str) -> str:
    """`msg_<...>` from a completion's id (the same suffix), or a new one."""
    suffix = chat_id.removeprefix("chatcmpl-")
    return f"msg_{suffix}" if suffix else new_id("msg_")
