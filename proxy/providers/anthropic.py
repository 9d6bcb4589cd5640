"""Anthropic's native Messages API (`POST {base_url}/v1/messages`) as a chat provider.

The client's chat request is translated to a Messages request (`translate/to_anthropic.py`:
system prompts, tools and tool results, images, stop sequences; `max_tokens` from the
request, else the entry's `max_tokens`, else this provider's, since Anthropic requires
one), and the answer back to a `chat.completion` or `chat.completion.chunk`s with usage
(`translate/from_anthropic.py`). Only chat is served (other ops are `unsupported`).

Only the provider's configured headers, `x-api-key` and `anthropic-version` go upstream,
never the client's; redirects are never followed. Errors: 529 `overloaded_error` and
every 5xx -> `server_error` (falls back), 429 -> `rate_limited` with its `retry-after`,
400/413/422 -> `client_error` (the request is wrong everywhere), 401/403 ->
`upstream_auth`, 404 -> `model_missing`; an `error` event before the first chunk falls
back like a status, after it the stream fails. A request from an Anthropic client
(`/v1/messages`) is sent as the client wrote it and its answer rides along with the chat
one, so the route can relay it as is (`translate/anthropic_native.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated

import msgspec

from ..config import BaseProviderSpec, ProviderConfig
from ..errors import InvalidRequest, UpstreamError
from ..policy import client_error, status_error
from ..reasons import Reason
from ..translate import anthropic_wire as aw
from ..translate.anthropic_native import NativeChat, attach
from ..translate.from_anthropic import ChunkMaker, decode_message, to_completion
from ..translate.to_anthropic import ChatIn, to_anthropic
from ..upstream import Client, Response
from .base import Call, Completion, Op, Probe
from .http import fetch, read_capped, read_timeout
from .sse import iter_sse

ANTHROPIC_URL = "https://api.anthropic.com"
_error = msgspec.json.Decoder(aw.ErrorBody)


class Spec(BaseProviderSpec, tag="anthropic"):
    """Anthropic's Messages API; entries name Claude models (`claude-sonnet-4-5`, ...)."""

    base_url: str = ANTHROPIC_URL
    api_key: str | None = None
    headers: dict[str, str] = {}
    anthropic_version: str = "2023-06-01"
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 4096  # when the request sets none
    max_response_bytes: int = 64 * 1024 * 1024  # a non-stream answer, decompressed


AnthropicSpec = Spec


def upstream_headers(config: ProviderConfig) -> dict[str, str]:
    """The provider's own headers, its key and API version: never anything of the client's."""
    spec = config.spec
    assert isinstance(spec, Spec)
    headers = {"content-type": "application/json", "accept": "application/json"}
    headers.update(config.headers)
    headers["anthropic-version"] = spec.anthropic_version
    if config.api_key:
        headers["x-api-key"] = config.api_key.reveal()
    return headers


class Adapter:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, Spec)
        self.name = config.name
        self._spec = spec
        self._url = f"{spec.base_url}/v1/messages"
        self._headers = upstream_headers(config)
        self._client: Client | None = None

    def _body(self, call: Call, stream: bool) -> bytes:
        if call.op is not Op.CHAT:
            raise UpstreamError(
                Reason.UNSUPPORTED, f"the Anthropic provider does not serve {call.op}"
            )
        if isinstance(call.request, NativeChat):  # an Anthropic client: its own body, as is
            return call.request.native_body(call.entry.model, stream)
        budget = call.entry.max_tokens or self._spec.max_tokens
        try:
            chat: ChatIn = call.request.decode(ChatIn)
            request = to_anthropic(chat, call.entry.model, budget, stream)
        except InvalidRequest as exc:  # the request is wrong for every provider
            raise client_error(exc.message, exc.param) from None
        return aw.encode(request)

    async def _post(self, call: Call, stream: bool) -> Response:
        entry = call.entry
        body = self._body(call, stream)
        if self._client is None:
            self._client = Client(self._headers)
        return await self._client.post(
            self._url, body, b"", entry.connect_timeout, read_timeout(entry, stream)
        )

    async def complete(self, call: Call) -> Completion:
        async with await self._post(call, stream=False) as resp:
            body = await read_capped(resp, self._spec.max_response_bytes)
            if resp.status != 200:
                raise _status_error(resp.status, body, resp.headers)
        answer = to_completion(decode_message(body), call.entry.model)
        encoded = aw.encode(answer)
        if isinstance(call.request, NativeChat):
            encoded = attach(encoded, body)
        return Completion(encoded, answer.usage)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        async with await self._post(call, stream=True) as resp:
            if resp.status != 200:
                body = await read_capped(resp, 1024 * 1024)
                raise _status_error(resp.status, body, resp.headers)
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                raise UpstreamError(Reason.BAD_RESPONSE, f"expected an event stream, got '{ctype}'")
            maker = ChunkMaker(call.entry.model, call.request.include_usage)
            native = isinstance(call.request, NativeChat)
            async for data in iter_sse(resp):
                chunks = maker.feed(data)
                if native:  # each event rides along, on a chunk of its own if it made none
                    last = chunks.pop() if chunks else maker.empty()
                    chunks.append(attach(last, data.replace(b"\n", b" ")))
                for chunk in chunks:
                    yield chunk
                if maker.done:
                    return
        raise UpstreamError(Reason.BAD_RESPONSE, "Anthropic stream ended without message_stop")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _status_error(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    kind, message = error_fields(body)
    return status_error(status, message, headers, None, kind)


def error_fields(body: bytes) -> tuple[str | None, str]:
    """(type, message) from an Anthropic error body, or its first bytes when it is not one."""
    try:
        obj = _error.decode(body)
    except msgspec.DecodeError:
        return None, body[:300].decode("utf-8", "replace").strip() or "no body"
    return obj.error.type, obj.error.message


class _Model(msgspec.Struct):
    id: str = ""


class _Models(msgspec.Struct):
    data: list[_Model] = []


async def probe(config: ProviderConfig) -> Probe:
    """`GET /v1/models`: reachable with this key, and the model ids it lists."""
    spec = config.spec
    assert isinstance(spec, Spec)
    url = f"{spec.base_url}/v1/models?limit=1000"
    status, body = await fetch(url, upstream_headers(config), spec.connect_timeout)
    if status != 200:
        return Probe(False, f"HTTP {status}: {error_fields(body)[1][:200]}")
    try:
        listing = msgspec.json.decode(body, type=_Models)
    except msgspec.DecodeError:
        return Probe(False, "GET /v1/models answered something that is not a model list")
    return Probe(True, "reachable", {m.id for m in listing.data})
