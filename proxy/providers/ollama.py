"""Ollama's native API (`POST /api/chat`), translated both ways so a client sees OpenAI.

Request: OpenAI messages become Ollama messages (content parts joined; `image_url` data
URLs become `images` base64, other image URLs are the client's error since Ollama cannot
fetch them; `developer` becomes `system`; assistant `tool_calls` arguments become objects;
a `tool` message gets the `tool_name` of the call it answers); `tools` pass through
(unless `tool_choice` is `"none"`); `response_format` becomes `format` (`"json"` or the
JSON schema); sampling fields become `options` (`max_tokens` / `max_completion_tokens`
-> `num_predict`), over the provider's own `options`; the provider's `keep_alive` is sent
as is. Only the provider's configured headers go upstream, never the client's.

Response: NDJSON lines (`done: false` deltas, then a `done: true` line with counts and
nanosecond durations) become `chat.completion.chunk`s; one object becomes a
`chat.completion`. Tool calls get `call_<hex>` ids and indexes; `done_reason` maps to
`finish_reason`; `prompt_eval_count`/`eval_count` become `usage` (also as the final
`include_usage` chunk).

Errors: `{"error": "..."}` bodies map through `policy.status_reason` (404: the model is not
pulled -> `model_missing`; 5xx -> `server_error`; 400 -> `client_error`); an error line
before any content falls back, after it the stream fails (the app sends a final error
event); a stream without its `done` line is truncated (`bad_response`). When
`check_models` is on, `/api/tags` is cached for 30 s and a model that is not pulled is
skipped without calling `/api/chat` (a failed tags call never fails the request).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp
import msgspec

from ..config import OllamaSpec, ProviderConfig
from ..errors import InvalidRequest, UpstreamError
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
MAX_LINE = 16 * 1024 * 1024  # one NDJSON line (a whole tool call can be long)


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
    error: Any = None


class _Tag(msgspec.Struct):
    name: str = ""
    model: str = ""


class _Tags(msgspec.Struct):
    models: list[_Tag] = []


_line = msgspec.json.Decoder(_Line)
_tags = msgspec.json.Decoder(_Tags)
_error = msgspec.json.Decoder(dict[str, Any])
_arguments = msgspec.json.Decoder()
_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_ROLES = {"developer": "system"}


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
        self._pulled: set[str] | None = None  # None: unknown (tags not fetched or failed)
        self._pulled_at = -TAGS_TTL
        self._tags_lock = asyncio.Lock()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=("User-Agent",)
            )
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
            raise UpstreamError("server_error", f"Ollama error: {_error_text(line.error)}")
        if line.message is None:
            raise UpstreamError("bad_response", "Ollama answered 200 without a message")
        calls = _tool_calls(line.message)
        usage = _usage(line)
        message = OutMessage(
            content=line.message.content or (None if calls else ""),
            tool_calls=calls or msgspec.UNSET,
        )
        answer = ChatCompletion(
            id=completion_id(),
            created=now(),
            model=call.entry.model,
            choices=[Choice(index=0, message=message, finish_reason=_finish(line, bool(calls)))],
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
            n_calls = 0
            async with aclosing(_ndjson(resp.content)) as lines:
                async for line in lines:
                    message = line.message or _Message()
                    calls = _tool_calls(message)
                    if not started and (message.content or calls or line.done):
                        started = True
                        yield chunk(Delta(role="assistant", content=""))
                    if message.content:
                        yield chunk(Delta(content=message.content))
                    if calls:
                        deltas = [_delta_call(c, n_calls + i) for i, c in enumerate(calls)]
                        n_calls += len(calls)
                        yield chunk(Delta(tool_calls=deltas))
                    if line.done:
                        yield chunk(Delta(), _finish(line, n_calls > 0))
                        if call.request.include_usage:
                            usage = _usage(line)
                            yield encode(Chunk(cid, created, model, choices=[], usage=usage))
                        return
        raise UpstreamError("bad_response", "Ollama stream ended without its done line")

    async def _post(self, call: Call, stream: bool) -> aiohttp.ClientResponse:
        entry = call.entry
        try:
            chat: ChatBody = call.request.decode(ChatBody)
        except InvalidRequest as exc:  # the request is wrong for every provider
            raise UpstreamError(CLIENT_ERROR, exc.message, 400, param=exc.param) from None
        body = encode(translate(chat, entry.model, self._spec, stream))
        if self._spec.check_models:
            await self._check_pulled(entry.model, entry.connect_timeout)
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=entry.connect_timeout,
            # Streams: the gap allowed between lines once they flow.
            sock_read=entry.timeout if stream else None,
        )
        return await self._client().post(
            self._chat_url, data=body, headers=self._headers, timeout=timeout
        )

    async def _check_pulled(self, model: str, connect_timeout: float) -> None:
        """Skip a model that is not pulled, from a cached /api/tags (never fail on the cache)."""
        async with self._tags_lock:  # one tags call at a time; the others use its answer
            if time.monotonic() - self._pulled_at > TAGS_TTL:
                self._pulled = await self._fetch_tags(connect_timeout)
                self._pulled_at = time.monotonic()
        pulled = self._pulled
        if pulled is not None and model not in pulled and f"{model}:latest" not in pulled:
            raise UpstreamError("model_missing", f"model '{model}' is not pulled on this server")

    async def _fetch_tags(self, connect_timeout: float) -> set[str] | None:
        timeout = aiohttp.ClientTimeout(total=connect_timeout + 2, sock_connect=connect_timeout)
        try:
            async with self._client().get(
                self._tags_url, headers=self._headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    return None
                tags = _tags.decode(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError):
            return None  # the chat call itself will say what is wrong
        return {t.name for t in tags.models} | {t.model for t in tags.models}

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
    if body.tools and body.tool_choice != "none":
        out["tools"] = body.tools
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        out["format"] = "json"
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        out["format"] = schema if isinstance(schema, dict) else "json"
    options = dict(spec.options)
    for name in _OPTIONS:
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
    if spec.keep_alive is not None:
        out["keep_alive"] = spec.keep_alive
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
            "unsupported",
            "Ollama cannot fetch image URLs: send the image inline as a base64 data URL "
            "(data:image/png;base64,...)",
        )
    message = "An image must be a base64 data URL (data:image/png;base64,...)"
    raise UpstreamError(CLIENT_ERROR, message, 400, param="messages")


def _args(arguments: str) -> Any:
    try:
        return _arguments.decode(arguments or "{}")
    except msgspec.DecodeError:
        raise UpstreamError(
            CLIENT_ERROR, "tool call arguments must be a JSON string", 400, param="messages"
        ) from None


def _tool_calls(message: _Message) -> list[OutToolCall]:
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


async def _ndjson(content: aiohttp.StreamReader) -> AsyncGenerator[_Line, None]:
    """The stream's lines, decoded; an `{"error": ...}` line raises.

    Lines are split here, not by aiohttp's line reader, which stops at 512 KiB (a whole
    tool call comes as one line and can be longer).
    """
    buffer = bytearray()
    async for data in content.iter_any():
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            raw = bytes(buffer[start:end]).strip()
            if raw:
                yield _decode_line(raw)
            start = end + 1
        del buffer[:start]
        if len(buffer) > MAX_LINE:
            raise UpstreamError("bad_response", f"Ollama sent a line over {MAX_LINE} bytes")
    if buffer.strip():
        yield _decode_line(bytes(buffer).strip())


def _decode_line(raw: bytes) -> _Line:
    try:
        line = _line.decode(raw)
    except msgspec.DecodeError:
        raise UpstreamError("bad_response", "Ollama sent a line that is not JSON") from None
    if line.error is not None:
        raise UpstreamError("server_error", f"Ollama error mid-stream: {_error_text(line.error)}")
    return line


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or encode(error).decode())
    return str(error)


def _status_error(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    try:
        message = _error_text(_error.decode(body).get("error", ""))
    except msgspec.DecodeError:
        message = body[:300].decode("utf-8", "replace").strip()
    return UpstreamError(
        status_reason(status), message or f"HTTP {status}", status, retry_after(headers)
    )
