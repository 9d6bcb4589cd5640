"""Outbound: an OpenAI chat request as an Anthropic Messages request (the `anthropic` provider).

- `system` / `developer` messages become the top-level `system` (joined, wherever they
  stood: Anthropic has no system turns).
- user content parts: text -> `text` blocks; `image_url` data URLs -> `image` blocks with a
  base64 source; http(s) image URLs -> `image` blocks with a `url` source.
- assistant `tool_calls` -> `tool_use` blocks (arguments parsed: not JSON is the client's
  error); `tool` messages -> `tool_result` blocks in the user turn that follows the call.
  Consecutive turns of one role are merged (Anthropic wants them alternating); empty text
  is left out (Anthropic rejects empty text blocks).
- `tools` -> `{name, description, input_schema}`; `tool_choice` auto / required / none / a
  named function -> auto / any / none / tool; `parallel_tool_calls: false` ->
  `disable_parallel_tool_use`.
- `max_completion_tokens` or `max_tokens`, else the provider's `max_tokens` default
  (Anthropic requires one); `stop` -> `stop_sequences`; `temperature` (capped at 1, the
  top of Anthropic's range), `top_p`, `top_k` pass; `user` -> `metadata.user_id`.
- `response_format` json_object / json_schema: Anthropic has no JSON mode here, so the
  instruction (with the schema) is added to the system prompt.
- `n` > 1 cannot be served (`unsupported`: the next entry may).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import InvalidRequest, UpstreamError
from . import anthropic_wire as aw

_args = msgspec.json.Decoder()


class _ImageURL(msgspec.Struct):
    url: str


class _Part(msgspec.Struct):
    type: str
    text: str | None = None
    image_url: _ImageURL | str | None = None


class _Function(msgspec.Struct):
    name: str = ""
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    function: _Function
    id: str = ""


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None


class _FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct):
    type: str = "function"
    function: _FunctionDef | None = None


class _Format(msgspec.Struct):
    type: str
    json_schema: dict[str, Any] | None = None


class ChatIn(msgspec.Struct):
    """The chat request fields the Anthropic translation reads."""

    messages: list[_Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: _Format | None = None
    user: str | None = None
    n: int | None = None


def to_anthropic(
    chat: ChatIn, model: str, default_max_tokens: int, stream: bool
) -> aw.MessagesRequest:
    if chat.n is not None and chat.n > 1:
        raise UpstreamError("unsupported", "Anthropic answers one choice per request (n > 1)")
    system: list[str] = []
    turns: list[aw.InMessage] = []
    for i, m in enumerate(chat.messages):
        if m.role in ("system", "developer"):
            system.append(_text(m.content))
            continue
        role, blocks = _blocks(m, i)
        if not blocks:
            continue
        last = turns[-1] if turns else None
        if last is not None and last.role == role and isinstance(last.content, list):
            last.content.extend(blocks)
        else:
            turns.append(aw.InMessage(role=role, content=blocks))
    _json_instruction(chat.response_format, system)
    out = aw.MessagesRequest(
        model=model,
        messages=turns,
        max_tokens=chat.max_completion_tokens or chat.max_tokens or default_max_tokens,
    )
    if system:
        out.system = "\n\n".join(s for s in system if s)
    if stream:
        out.stream = True
    if chat.temperature is not None:
        out.temperature = min(chat.temperature, 1.0)
    if chat.top_p is not None:
        out.top_p = chat.top_p
    if chat.top_k is not None:
        out.top_k = chat.top_k
    if chat.stop:
        out.stop_sequences = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop)
    if chat.user:
        out.metadata = aw.Metadata(user_id=chat.user)
    if chat.tools:
        out.tools = [_tool(t) for t in chat.tools if t.function is not None]
    choice = _tool_choice(chat.tool_choice, chat.parallel_tool_calls)
    if choice is not None and out.tools:
        out.tool_choice = choice
    return out


def _text(content: str | list[_Part] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(p.text or "" for p in content if p.type == "text")


def _blocks(m: _Message, i: int) -> tuple[str, list[aw.Block]]:
    if m.role == "tool":
        block = aw.Block(
            type="tool_result", tool_use_id=m.tool_call_id or "", content=_text(m.content)
        )
        return "user", [block]
    if m.role not in ("user", "assistant"):
        raise InvalidRequest(f"Unknown role '{m.role}'.", param=f"messages[{i}].role")
    blocks: list[aw.Block] = []
    if isinstance(m.content, str):
        if m.content:
            blocks.append(aw.Block(type="text", text=m.content))
    else:
        for p in m.content or []:
            if p.type == "text" and p.text:
                blocks.append(aw.Block(type="text", text=p.text))
            elif p.type == "image_url" and p.image_url is not None:
                url = p.image_url if isinstance(p.image_url, str) else p.image_url.url
                blocks.append(aw.Block(type="image", source=image_source(url, i)))
    for call in m.tool_calls or []:
        try:
            args = _args.decode(call.function.arguments or "{}")
        except msgspec.DecodeError:
            raise InvalidRequest(
                "Tool call arguments must be a JSON object.", param=f"messages[{i}]"
            ) from None
        blocks.append(
            aw.Block(type="tool_use", id=call.id, name=call.function.name, input=args or {})
        )
    return m.role, blocks


def image_source(url: str, i: int) -> aw.Source:
    head, sep, data = url.partition(",")
    if sep and head.startswith("data:") and head.endswith(";base64"):
        return aw.Source(type="base64", media_type=head[5:-7], data=data)
    if url.startswith(("http://", "https://")):
        return aw.Source(type="url", url=url)
    raise InvalidRequest(
        "An image must be an http(s) URL or a base64 data URL.", param=f"messages[{i}]"
    )


def _tool(t: _Tool) -> aw.ToolSpec:
    f = t.function
    assert f is not None
    spec = aw.ToolSpec(name=f.name, input_schema=f.parameters or {"type": "object"})
    if f.description:
        spec.description = f.description
    return spec


def _tool_choice(
    choice: str | dict[str, Any] | None, parallel: bool | None
) -> aw.ToolChoice | None:
    if choice is None and parallel is None:
        return None
    if isinstance(choice, dict):
        function = choice.get("function") or {}
        name = function.get("name") if isinstance(function, dict) else None
        out = aw.ToolChoice(type="tool", name=str(name or ""))
    else:
        kinds = {None: "auto", "auto": "auto", "required": "any", "none": "none"}
        if choice not in kinds:
            raise InvalidRequest(f"Unknown tool_choice '{choice}'.", param="tool_choice")
        out = aw.ToolChoice(type=kinds[choice])
    if parallel is False and out.type != "none":
        out.disable_parallel_tool_use = True
    return out


def _json_instruction(fmt: _Format | None, system: list[str]) -> None:
    if fmt is None or fmt.type not in ("json_object", "json_schema"):
        return
    text = "Answer with a single JSON object only: no prose, no code fences."
    schema = (fmt.json_schema or {}).get("schema")
    if fmt.type == "json_schema" and schema is not None:
        text += " It must match this JSON schema: " + aw.encode(schema).decode()
    system.append(text)
