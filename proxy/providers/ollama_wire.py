"""Ollama's /api/chat wire format and its translation from and to OpenAI's (see ollama.py)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from ..errors import UpstreamError
from ..policy import client_error
from ..reasons import Reason
from ..wire import (
    ChatBody,
    DeltaToolCall,
    Message,
    OutFunction,
    OutToolCall,
    Usage,
    encode,
)


class _Function(msgspec.Struct):
    name: str = ""
    arguments: Any = None


class _ToolCall(msgspec.Struct):
    function: _Function


class Said(msgspec.Struct):
    content: str = ""
    tool_calls: list[_ToolCall] | None = None


class Line(msgspec.Struct):
    """One NDJSON line of /api/chat (or the whole non-stream answer)."""

    message: Said | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: Any = None


line_decoder = msgspec.json.Decoder(Line)
_arguments = msgspec.json.Decoder()
OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_ROLES = {"developer": "system"}


def translate(
    body: ChatBody, model: str, options_: dict[str, Any], keep_alive: Any, stream: bool
) -> dict[str, Any]:
    """An OpenAI chat body as Ollama's /api/chat body."""
    out: dict[str, Any] = {
        "model": model,
        "messages": _messages(body.messages),
        "stream": stream,
    }
    if body.tools and body.tool_choice != "none":
        out["tools"] = body.tools
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        out["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        out["format"] = schema if isinstance(schema, dict) else "json"
    options = dict(options_)
    for name in OPTIONS:
        value = getattr(body, name)
        if value is not None:
            options[name] = value
    limit = body.token_limit()
    if limit is not None:
        options["num_predict"] = limit
    if body.stop is not None:
        options["stop"] = body.stops()
    if options:
        out["options"] = options
    if keep_alive is not None:
        out["keep_alive"] = keep_alive
    return out


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool call id -> function name, for tool results
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": _ROLES.get(m.role, m.role), "content": m.text()}
        parts = [] if isinstance(m.content, str) else m.content or []
        images = [_image(p.image_url.url) for p in parts if p.image_url is not None]
        if images:
            item["images"] = images
        if m.tool_calls:
            item["tool_calls"] = [
                {"function": {"name": c.function.name, "arguments": _args(c.function.arguments)}}
                for c in m.tool_calls
            ]
            names.update({c.id: c.function.name for c in m.tool_calls if c.id})
        if m.role == "tool" and m.tool_call_id in names:
            item["tool_name"] = names[m.tool_call_id]
        out.append(item)
    return out


def _image(url: str) -> str:
    head, sep, data = url.partition(",")
    if sep and head.startswith("data:") and head.endswith(";base64"):
        return data
    if url.startswith(("http://", "https://")):  # another provider in the chain may fetch it
        raise UpstreamError(
            Reason.UNSUPPORTED,
            "Ollama cannot fetch image URLs: send the image inline as a base64 data URL "
            "(data:image/png;base64,...)",
        )
    raise client_error("An image must be a base64 data URL (data:image/png;base64,...)", "messages")


def _args(arguments: str) -> Any:
    try:
        return _arguments.decode(arguments or "{}")
    except msgspec.DecodeError:
        raise client_error("tool call arguments must be a JSON string", "messages") from None


def tool_calls(message: Said) -> list[OutToolCall]:
    out = []
    for c in message.tool_calls or []:
        args = c.function.arguments
        text = args if isinstance(args, str) else encode(args or {}).decode()
        out.append(
            OutToolCall(
                id=f"call_{uuid.uuid4().hex[:24]}", function=OutFunction(c.function.name, text)
            )
        )
    return out


def delta_call(call: OutToolCall, index: int) -> DeltaToolCall:
    function = {"name": call.function.name, "arguments": call.function.arguments}
    return DeltaToolCall(index=index, id=call.id, type="function", function=function)


def finish_reason(line: Line, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if line.done_reason == "length" else "stop"


def usage(line: Line) -> Usage:
    prompt, completion = line.prompt_eval_count or 0, line.eval_count or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
