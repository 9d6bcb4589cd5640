"""Ollama's native API (`POST /api/chat`), translated both ways so a client sees OpenAI.

Request: OpenAI messages become Ollama messages (content parts joined; `image_url` data
URLs become `images` base64; assistant `tool_calls` arguments become objects; a `tool`
message gets the `tool_name` of the call it answers); `tools` pass through;
`response_format` becomes `format` (`"json"` or the JSON schema); sampling fields become
`options` (`max_tokens` -> `num_predict`), over the provider's own `options`; the
provider's `keep_alive` is sent as is.

Response: NDJSON lines (`done: false` deltas, then a `done: true` line with counts and
nanosecond durations) become `chat.completion.chunk`s; one object becomes a
`chat.completion`. Tool calls get ids; `done_reason` maps to `finish_reason`;
`prompt_eval_count`/`eval_count` become `usage`.

Errors: `{"error": "..."}` bodies map through `policy.status_reason` (404: the model is not
pulled -> `model_missing`); an error line before any content falls back, after it the
stream fails (the app sends a final error event); a stream without its `done` line is
truncated. When `check_models` is on, `/api/tags` is cached for 30 s and a model that is
not pulled is skipped without calling `/api/chat`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgspec

from ..config import OllamaSpec, ProviderConfig
from ..errors import UpstreamError
from ..policy import CLIENT_ERROR, retry_after, status_reason
from ..wire import (
    ChatBody,
    ChatCompletion,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    DeltaToolCall,
    Message,
    OutFunction,
    OutMessage,
    OutToolCall,
    Usage,
    completion_id,
    encode,
    now,
)
from .base import Call, Completion

TAGS_TTL = 30.0


class _Function(msgspec.Struct):
    name: str = ""
    arguments: Any = None


class _ToolCall(msgspec.Struct):
    function: _Function


class _Message(msgspec.Struct):
    content: str = ""
    tool_calls: list[_ToolCall] | None = None


class _Line(msgspec.Struct):
    """One NDJSON line of /api/chat (or the whole non-stream answer)."""

    message: _Message | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: str | None = None


class _Tag(msgspec.Struct):
    name: str


class _Tags(msgspec.Struct):
    models: list[_Tag] = []


_line = msgspec.json.Decoder(_Line)
_tags = msgspec.json.Decoder(_Tags)
_error = msgspec.json.Decoder(dict[str, Any])
_arguments = msgspec.json.Decoder()
_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


class OllamaProvider:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, OllamaSpec)
        self.name = config.name
        self._spec = spec
        self._chat_url = f"{spec.base_url}/api/chat"
        self._tags_url = f"{spec.base_url}/api/tags"
        self._headers = {"Content-Type": "application/json", **config.headers}
        self._session: aiohttp.ClientSession | None = None
        self._pulled: set[str] | None = None
        self._pulled_at = 0.0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def complete(self, call: Call) -> Completion:
        async with await self._post(call, stream=False) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise _status_error(resp.status, body, resp.headers)
        try:
            line = _line.decode(body)
        except msgspec.DecodeError:
            raise UpstreamError("bad_response", "Ollama answered 200 with invalid JSON") from None
        if line.error is not None:
            raise UpstreamError("server_error", f"Ollama error: {line.error}")
        message = line.message or _Message()
        calls = _tool_calls(message)
        usage = _usage(line)
        answer = ChatCompletion(
            id=completion_id(),
            created=now(),
            model=call.entry.model,
            choices=[
                Choice(
                    index=0,
                    message=OutMessage(
                        content=message.content or (None if calls else ""),
                        tool_calls=calls or msgspec.UNSET,
                    ),
                    finish_reason=_finish(line, bool(calls)),
                )
            ],
            usage=usage,
        )
        return Completion(encode(answer), usage)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        cid, created, model = completion_id(), now(), call.entry.model

        def chunk(delta: Delta, finish: str | None = None) -> bytes:
            choice = ChunkChoice(index=0, delta=delta, finish_reason=finish)
            return encode(Chunk(id=cid, created=created, model=model, choices=[choice]))

        async with await self._post(call, stream=True) as resp:
            if resp.status != 200:
                raise _status_error(resp.status, await resp.read(), resp.headers)
            started = False
            calls: list[OutToolCall] = []
            async for raw in resp.content:
                if not raw.strip():
                    continue
                try:
                    line = _line.decode(raw)
                except msgspec.DecodeError:
                    raise UpstreamError(
                        "bad_response", "Ollama sent a line that is not JSON"
                    ) from None
                if line.error is not None:
                    raise UpstreamError("server_error", f"Ollama error mid-stream: {line.error}")
                message = line.message or _Message()
                new_calls = _tool_calls(message, offset=len(calls))
                if not started and (message.content or new_calls or line.done):
                    started = True
                    yield chunk(Delta(role="assistant", content=""))
                if message.content:
                    yield chunk(Delta(content=message.content))
                if new_calls:
                    calls += new_calls
                    yield chunk(Delta(tool_calls=[_delta_call(c, len(calls) - len(new_calls) + i)
                                                  for i, c in enumerate(new_calls)]))  # fmt: skip
                if line.done:
                    yield chunk(Delta(), _finish(line, bool(calls)))
                    if call.request.include_usage:
                        yield encode(
                            Chunk(
                                id=cid, created=created, model=model, choices=[], usage=_usage(line)
                            )
                        )
                    return
        raise UpstreamError("bad_response", "Ollama stream ended without its done line")

    async def _post(self, call: Call, stream: bool) -> Any:
        entry = call.entry
        if self._spec.check_models:
            await self._check_pulled(entry.model, entry.connect_timeout)
        body = encode(translate(call.request.decode(ChatBody), entry.model, self._spec, stream))
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=entry.connect_timeout,
            sock_read=entry.timeout if stream else None,
        )
        return self._client().post(
            self._chat_url, data=body, headers=self._headers, timeout=timeout
        )

    async def _check_pulled(self, model: str, connect_timeout: float) -> None:
        """Skip a model that is not pulled, from a cached /api/tags (never fail on the cache)."""
        if self._pulled is None or time.monotonic() - self._pulled_at > TAGS_TTL:
            self._pulled_at = time.monotonic()
            try:
                timeout = aiohttp.ClientTimeout(
                    total=connect_timeout + 2, sock_connect=connect_timeout
                )
                async with self._client().get(self._tags_url, timeout=timeout) as resp:
                    tags = _tags.decode(await resp.read()) if resp.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError):
                tags = None  # the chat call itself will say what is wrong
            self._pulled = None if tags is None else {t.name for t in tags.models}
        pulled = self._pulled
        if pulled is not None and model not in pulled and f"{model}:latest" not in pulled:
            raise UpstreamError("model_missing", f"model '{model}' is not pulled on this server")

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def translate(body: ChatBody, model: str, spec: OllamaSpec, stream: bool) -> dict[str, Any]:
    """An OpenAI chat body as Ollama's /api/chat body."""
    out: dict[str, Any] = {
        "model": model,
        "messages": _messages(body.messages),
        "stream": stream,
    }
    if body.tools:
        out["tools"] = body.tools
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        out["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema:
        out["format"] = fmt.json_schema.get("schema", {})
    options = dict(spec.options)
    for name in _OPTIONS:
        value = getattr(body, name)
        if value is not None:
            options[name] = value
    if body.token_limit() is not None:
        options["num_predict"] = body.token_limit()
    if body.stop is not None:
        options["stop"] = body.stops()
    if options:
        out["options"] = options
    if spec.keep_alive is not None:
        out["keep_alive"] = spec.keep_alive
    return out


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool call id -> function name, for tool results
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
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
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise UpstreamError(
            CLIENT_ERROR, "Ollama accepts images only as base64 data URLs", 400, param="messages"
        )
    return data


def _args(arguments: str) -> Any:
    try:
        return _arguments.decode(arguments or "{}")
    except msgspec.DecodeError:
        raise UpstreamError(
            CLIENT_ERROR, "tool call arguments must be a JSON string", 400, param="messages"
        ) from None


def _tool_calls(message: _Message, offset: int = 0) -> list[OutToolCall]:
    return [
        OutToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            function=OutFunction(
                name=c.function.name,
                arguments=c.function.arguments
                if isinstance(c.function.arguments, str)
                else encode(c.function.arguments or {}).decode(),
            ),
        )
        for c in message.tool_calls or []
    ]


def _delta_call(call: OutToolCall, index: int) -> DeltaToolCall:
    function = {"name": call.function.name, "arguments": call.function.arguments}
    return DeltaToolCall(index=index, id=call.id, type="function", function=function)


def _finish(line: _Line, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if line.done_reason == "length" else "stop"


def _usage(line: _Line) -> Usage:
    prompt, completion = line.prompt_eval_count or 0, line.eval_count or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _status_error(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    try:
        message = str(_error.decode(body).get("error", ""))
    except msgspec.DecodeError:
        message = body[:300].decode("utf-8", "replace")
    return UpstreamError(
        status_reason(status), message or f"HTTP {status}", status, retry_after(headers)
    )
