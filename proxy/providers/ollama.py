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
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import msgspec

from ..config import BaseProviderSpec, Entry, EntrySpec, ProviderConfig
from ..errors import InvalidRequest, UpstreamError
from ..policy import client_error, status_error
from ..reasons import Reason
from ..upstream import Client, ProtocolError, Response
from ..wire import (
    ChatBody,
    ChatCompletion,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    OutMessage,
    completion_id,
    encode,
    now,
)
from .base import Call, Completion, Op, Probe
from .http import Listing, get_json, read_capped, read_timeout
from .ollama_ops import OllamaOps
from .ollama_wire import (
    Line,
    Said,
    delta_call,
    finish_reason,
    line_decoder,
    tool_calls,
    translate,
    usage,
)

TAGS_TTL = 30.0
MAX_LINE = 16 * 1024 * 1024  # one NDJSON line (a whole tool call can be long)
MAX_BODY = 64 * 1024 * 1024


class Spec(BaseProviderSpec, tag="ollama"):
    """Ollama's native API (/api/chat, NDJSON)."""

    base_url: str = "${OLLAMA_BASE_URL:-http://localhost:11434}"
    headers: dict[str, str] = {}
    options: dict[str, Any] = {}
    keep_alive: str | int | None = None
    check_models: bool = True

    def context_window(self, entry: EntrySpec) -> int | None:
        num_ctx = self.options.get("num_ctx")
        return num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else None


class _Tag(msgspec.Struct):
    name: str = ""
    model: str = ""


class _Tags(msgspec.Struct):
    models: list[_Tag] = []


_tags = msgspec.json.Decoder(_Tags)
_error = msgspec.json.Decoder(dict[str, Any])


class Adapter:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, Spec)
        self.name = config.name
        self._spec = spec
        self._chat_url = f"{spec.base_url}/api/chat"
        self._tags_url = f"{spec.base_url}/api/tags"
        self._headers = {"Content-Type": "application/json", **config.headers}
        self._http: Client | None = None
        self._pulled: set[str] | None = None  # None: unknown (tags not fetched or failed)
        self._pulled_at = -TAGS_TTL
        self._tags_lock = asyncio.Lock()
        # /api/embed and /api/generate (embeddings, legacy completions): ollama_ops.py
        self._ops = OllamaOps(
            spec.base_url, spec.options, spec.keep_alive, self._client, self._ready
        )

    async def _ready(self, entry: Entry) -> None:
        if self._spec.check_models:
            await self._check_pulled(entry.model, entry.connect_timeout)

    def _client(self) -> Client:
        if self._http is None:
            self._http = Client(self._headers)
        return self._http

    async def complete(self, call: Call) -> Completion:
        if call.op is not Op.CHAT:
            return await self._ops.complete(call)
        async with await self._post(call, stream=False) as resp:
            body = await read_capped(resp, MAX_BODY)
            if resp.status != 200:
                raise _status_error(resp.status, body, resp.headers)
        try:
            line = line_decoder.decode(body)
        except msgspec.DecodeError:
            raise UpstreamError("bad_response", "Ollama answered 200 with invalid JSON") from None
        if line.error is not None:
            raise UpstreamError("server_error", f"Ollama error: {_error_text(line.error)}")
        if line.message is None:
            raise UpstreamError("bad_response", "Ollama answered 200 without a message")
        calls = tool_calls(line.message)
        used = usage(line)
        message = OutMessage(
            content=line.message.content or (None if calls else ""),
            tool_calls=calls or msgspec.UNSET,
        )
        answer = ChatCompletion(
            id=completion_id(),
            created=now(),
            model=call.entry.model,
            choices=[
                Choice(index=0, message=message, finish_reason=finish_reason(line, bool(calls)))
            ],
            usage=used,
        )
        return Completion(encode(answer), used)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        if call.op is not Op.CHAT:
            async with aclosing(self._ops.stream(call)) as parts:
                async for part in parts:
                    yield part
            return
        cid, created, model = completion_id(), now(), call.entry.model

        def chunk(delta: Delta, finish: str | None = None) -> bytes:
            choice = ChunkChoice(index=0, delta=delta, finish_reason=finish)
            return encode(Chunk(id=cid, created=created, model=model, choices=[choice]))

        async with await self._post(call, stream=True) as resp:
            if resp.status != 200:
                raise _status_error(resp.status, await read_capped(resp, MAX_LINE), resp.headers)
            started = False
            n_calls = 0
            async with aclosing(_ndjson(resp)) as lines:
                async for line in lines:
                    message = line.message or Said()
                    calls = tool_calls(message)
                    if not started and (message.content or calls or line.done):
                        started = True
                        yield chunk(Delta(role="assistant", content=""))
                    if message.content:
                        yield chunk(Delta(content=message.content))
                    if calls:
                        deltas = [delta_call(c, n_calls + i) for i, c in enumerate(calls)]
                        n_calls += len(calls)
                        yield chunk(Delta(tool_calls=deltas))
                    if line.done:
                        yield chunk(Delta(), finish_reason(line, n_calls > 0))
                        if call.request.include_usage:
                            yield encode(Chunk(cid, created, model, choices=[], usage=usage(line)))
                        return
        raise UpstreamError("bad_response", "Ollama stream ended without its done line")

    def _body(self, call: Call, stream: bool) -> bytes:
        """The client's request as Ollama's; anything wrong in it is the client's error."""
        if call.op is not Op.CHAT:
            raise UpstreamError(Reason.UNSUPPORTED, f"this Ollama adapter does not serve {call.op}")
        try:
            chat: ChatBody = call.request.decode(ChatBody)
            spec = self._spec
            return encode(translate(chat, call.entry.model, spec.options, spec.keep_alive, stream))
        except InvalidRequest as exc:  # the request is wrong for every provider
            raise client_error(exc.message, exc.param) from None
        except UpstreamError:
            raise
        except Exception as exc:  # noqa: BLE001 - translating the client's input failed
            raise client_error(f"The request could not be translated for Ollama: {exc}") from None

    async def _post(self, call: Call, stream: bool) -> Response:
        entry = call.entry
        body = self._body(call, stream)
        if self._spec.check_models:
            await self._check_pulled(entry.model, entry.connect_timeout)
        return await self._client().post(
            self._chat_url, body, b"", entry.connect_timeout, read_timeout(entry, stream)
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
        try:
            resp = await self._client().get(self._tags_url, connect_timeout, connect_timeout + 2)
            async with resp:
                if resp.status != 200:
                    return None
                tags = _tags.decode(await read_capped(resp, MAX_LINE))
        except (ProtocolError, OSError, TimeoutError, msgspec.DecodeError, UpstreamError):
            return None  # the chat call itself will say what is wrong
        return {t.name for t in tags.models} | {t.model for t in tags.models}

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


async def probe(config: ProviderConfig) -> Probe:
    spec = config.spec
    assert isinstance(spec, Spec)
    body: Listing = await get_json(
        f"{spec.base_url}/api/tags", dict(config.headers), spec.connect_timeout
    )
    names = {str(m.get("name")) for m in body.models}
    # "qwen2:7b-instruct" may be asked for as "qwen2:7b-instruct" or "qwen2" (= ":latest")
    names |= {n.removesuffix(":latest") for n in names}
    return Probe(True, "reachable", names)


async def _ndjson(content: Response) -> AsyncGenerator[Line, None]:
    """The stream's lines, decoded; an `{"error": ...}` line raises.

    Lines are split here from the reads as they come, up to `MAX_LINE` (a whole tool call
    comes as one line and can be long).
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


def _decode_line(raw: bytes) -> Line:
    try:
        line = line_decoder.decode(raw)
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
        obj = _error.decode(body)
        message = _error_text(obj.get("error", "") if isinstance(obj, dict) else obj)
    except msgspec.DecodeError:
        message = body[:300].decode("utf-8", "replace").strip()
    return status_error(status, message, headers)
