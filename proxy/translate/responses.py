"""Inbound OpenAI Responses API: a `/v1/responses` request as a chat request, and a chat
completion as a `response` object (streams: `responses_stream.py`).

Request: `instructions` becomes the first `system` message; `input` (a string: one user
message) items become chat messages: `message` items (roles user / assistant / system;
`developer` -> `system`) with `input_text` / `output_text` / `refusal` text and
`input_image` URLs; consecutive `function_call` items become one assistant message's
`tool_calls` (`call_id` kept as the call id); `function_call_output` becomes a `tool`
message; `reasoning` items are dropped (no upstream here can take them back). Function
`tools` (flat) become chat's nested function tools; `tool_choice` none / auto / required /
`{"type": "function", "name"}` map one to one; `text.format` json_object / json_schema
-> `response_format`; `max_output_tokens` -> `max_tokens`; `temperature`, `top_p`,
`parallel_tool_calls`, `user` pass. Built-in tools, files, `background`,
`conversation` and `prompt` are the client's error (400).

Answer: text -> one `message` item with an `output_text` part; tool calls ->
`function_call` items (`call_id` = the chat call id); `finish_reason` length /
content_filter -> status `incomplete` with `incomplete_details.reason`
max_output_tokens / content_filter; usage -> `input_tokens` / `output_tokens` /
`total_tokens` (cached input tokens carried).
"""

from __future__ import annotations

import time

import msgspec
from msgspec import UNSET

from ..errors import InvalidRequest
from . import responses_wire as rw
from .chat import (
    ChatMessage,
    ChatRequest,
    CompletionView,
    Function,
    FunctionDef,
    Part,
    Tool,
    ToolCall,
    UsageView,
    decode_body,
    function_choice,
    image_part,
    new_id,
    no_parameters,
    text_part,
)

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_request_decoder = msgspec.json.Decoder(rw.ResponsesRequest)


def decode_request(body: bytes) -> rw.ResponsesRequest:
    return decode_body(_request_decoder, body)


def check_supported(req: rw.ResponsesRequest) -> None:
    """The request features this gateway cannot honour are the client's 400, never ignored."""
    for name in ("background", "conversation", "prompt"):
        if getattr(req, name):
            raise InvalidRequest(f"'{name}' is not supported by this gateway.", param=name)
    if req.input is None and req.previous_response_id is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")


def input_messages(req: rw.ResponsesRequest) -> list[ChatMessage]:
    """The chat messages of `input` alone (no instructions): what a stored response keeps."""
    if req.input is None:
        return []
    if isinstance(req.input, str):
        return [ChatMessage(role="user", content=req.input)]
    out: list[ChatMessage] = []
    for i, item in enumerate(req.input):
        kind = item.type or "message"
        if kind == "message":
            out.append(_message(item, i))
        elif kind == "function_call":
            call = ToolCall(
                id=item.call_id or item.id or new_id("call_"),
                function=Function(item.name or "", item.arguments or "{}"),
            )
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and _open_for_calls(last):
                calls = last.tool_calls if isinstance(last.tool_calls, list) else []
                last.tool_calls = [*calls, call]
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            if not item.call_id:
                raise InvalidRequest("A function_call_output needs a call_id.", param=f"input[{i}]")
            text = item.output if isinstance(item.output, str) else _text(item.output or [], i)
            out.append(ChatMessage(role="tool", content=text, tool_call_id=item.call_id))
        elif kind != "reasoning":
            raise InvalidRequest(
                f"Input items of type '{kind}' are not supported by this gateway.",
                param=f"input[{i}]",
            )
    return out


def _open_for_calls(message: ChatMessage) -> bool:
    """An assistant message that later function_call items can join (no tool results yet)."""
    return message.content is None or isinstance(message.content, str)


def _message(item: rw.InputItem, i: int) -> ChatMessage:
    role = _ROLES.get(item.role or "")
    if role is None:
        raise InvalidRequest(f"Unknown role '{item.role}'.", param=f"input[{i}].role")
    if isinstance(item.content, str) or item.content is None:
        return ChatMessage(role=role, content=item.content or "")
    parts: list[Part] = []
    for p in item.content:
        if p.type in _TEXT_PARTS:
            parts.append(text_part(p.text or ""))
        elif p.type == "refusal":
            parts.append(text_part(p.refusal or ""))
        elif p.type == "input_image" and p.image_url:
            parts.append(image_part(p.image_url, p.detail if p.detail != "auto" else None))
        else:
            what = "file ids" if p.type == "input_image" else f"'{p.type}' content"
            raise InvalidRequest(f"{what} are not supported by this gateway.", param=f"input[{i}]")
    if role != "user" or all(p.type == "text" for p in parts):
        return ChatMessage(role=role, content="".join(p.text or "" for p in parts))
    return ChatMessage(role=role, content=parts)


def _text(parts: list[rw.InputPart], i: int) -> str:
    if any(p.type not in _TEXT_PARTS for p in parts):
        raise InvalidRequest("A function_call_output may hold text only.", param=f"input[{i}]")
    return "".join(p.text or "" for p in parts)


def to_chat(
    req: rw.ResponsesRequest, history: list[ChatMessage] | None = None, model: str | None = None
) -> ChatRequest:
    """A Responses request as a chat request; `history` is a previous response's conversation."""
    check_supported(req)
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
    messages += history or []
    messages += input_messages(req)
    out = ChatRequest(model=model or req.model, messages=messages)
    if req.max_output_tokens is not None:
        out.max_tokens = req.max_output_tokens
    if req.temperature is not None:
        out.temperature = req.temperature
    if req.top_p is not None:
        out.top_p = req.top_p
    if req.user:
        out.user = req.user
    if req.tools:
        out.tools = [_tool(t, i) for i, t in enumerate(req.tools)]
        if req.parallel_tool_calls is not None:
            out.parallel_tool_calls = req.parallel_tool_calls
    if req.tool_choice is not None:
        choice = _tool_choice(req.tool_choice)  # checked even when it has nothing to choose
        if req.tools:
            out.tool_choice = choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_object":
        out.response_format = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema: dict[str, object] = {"name": fmt.name or "response", "schema": fmt.schema or {}}
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        if fmt.description:
            schema["description"] = fmt.description
        out.response_format = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None and fmt.type != "text":
        raise InvalidRequest(f"text.format '{fmt.type}' is not supported.", param="text.format")
    return out.streaming() if req.stream else out


def _tool(t: rw.ToolParam, i: int) -> Tool:
    if t.type != "function" or not t.name:
        raise InvalidRequest(
            f"Only function tools are supported by this gateway, not '{t.type}'.",
            param=f"tools[{i}]",
        )
    function = FunctionDef(name=t.name, parameters=t.parameters or no_parameters())
    if t.description:
        function.description = t.description
    if t.strict is not None:
        function.strict = t.strict
    return Tool(function=function)


def _tool_choice(choice: str | dict[str, object]) -> str | dict[str, object]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"Unknown tool_choice '{choice}'.", param="tool_choice")
        return choice
    name = choice.get("name")
    if choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequest("Only function tool choices are supported.", param="tool_choice")
    return function_choice(name)


# ---- the answer ------------------------------------------------------------------------


def skeleton(req: rw.ResponsesRequest, response_id: str | None = None) -> rw.Response:
    """The response object before any output: what `response.created` carries."""
    tools = [
        rw.FunctionTool(
            name=t.name or "", description=t.description, parameters=t.parameters, strict=t.strict
        )
        for t in req.tools or []
    ]
    text = rw.TextConfig()
    fmt = req.text.format if req.text else None
    if fmt is not None:
        text.format = rw.Format(type=fmt.type)
        if fmt.type == "json_schema":
            text.format.name = fmt.name or "response"
            text.format.schema = fmt.schema or {}
            if fmt.strict is not None:
                text.format.strict = fmt.strict
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    return rw.Response(
        id=response_id or new_id("resp_"),
        created_at=int(time.time()),
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        model=req.model,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        previous_response_id=req.previous_response_id,
        temperature=req.temperature,
        top_p=req.top_p,
        text=text,
        tool_choice=choice,
        tools=tools,
        user=req.user or UNSET,
        metadata=dict(req.metadata or {}),
        store=req.store is not False,
    )


def usage(view: UsageView | None) -> rw.ResponseUsage | msgspec.UnsetType:
    if view is None:
        return UNSET
    prompt, completion = view.prompt_tokens or 0, view.completion_tokens or 0
    return rw.ResponseUsage(
        input_tokens=prompt,
        output_tokens=completion,
        total_tokens=view.total_tokens or prompt + completion,
        input_tokens_details=rw.InputTokensDetails(cached_tokens=view.cached),
    )


def finish(response: rw.Response, finish_reason: str | None) -> rw.Response:
    """Set the final status (and its details) from the chat finish reason."""
    reason = _INCOMPLETE.get(finish_reason or "")
    if reason:
        response.status = "incomplete"
        response.incomplete_details = rw.IncompleteDetails(reason)
        for item in response.output:
            if isinstance(item, rw.MessageItem):
                item.status = "incomplete"
    else:
        response.status = "completed"
        response.completed_at = int(time.time())
    return response


def to_response(view: CompletionView, response: rw.Response) -> rw.Response:
    """A chat completion as the finished `response` (fills the skeleton)."""
    choice = view.choices[0] if view.choices else None
    message = choice.message if choice else None
    output: list[rw.OutputItem] = []
    text = (message.content or message.refusal) if message else None
    if text:
        part = rw.OutputText(text=text)
        output.append(rw.MessageItem(id=new_id("msg_"), content=[part]))
    for call in (message.tool_calls if message else None) or []:
        function = call.function
        output.append(
            rw.FunctionCallItem(
                id=new_id("fc_"),
                call_id=call.id or new_id("call_"),
                name=(function.name if function else None) or "",
                arguments=(function.arguments if function else None) or "",
            )
        )
    response.output = output
    response.usage = usage(view.usage)
    return finish(response, choice.finish_reason if choice else None)


def output_messages(response: rw.Response) -> list[ChatMessage]:
    """A response's output as the chat assistant message a next turn continues from."""
    texts = [
        p.text for item in response.output if isinstance(item, rw.MessageItem) for p in item.content
    ]
    calls = [
        ToolCall(id=item.call_id, function=Function(item.name, item.arguments))
        for item in response.output
        if isinstance(item, rw.FunctionCallItem)
    ]
    message = ChatMessage(role="assistant", content="".join(texts) if texts else None)
    if calls:
        message.tool_calls = calls
    return [message]
