"""Anthropic's native Messages API (`POST {base_url}/v1/messages`) as a chat provider.

The client's chat request is translated to a Messages request (`translate/to_anthropic.py`:
system prompts, tools and tool results, images, stop sequences; `max_tokens` from the
request, else this provider's `max_tokens`, since Anthropic requires one), and the answer
back to a `chat.completion` or `chat.completion.chunk`s with usage
(`translate/from_anthropic.py`).

Only the provider's configured headers, `x-api-key` and `anthropic-version` go upstream,
never the client's; redirects are never followed. Errors: 529 `overloaded_error` and
every 5xx -> `server_error` (falls back), 429 -> `rate_limited` with its `retry-after`,
400/413/422 -> `client_error` (the request is wrong everywhere), 401/403 ->
`upstream_auth`, 404 -> `model_missing`; an `error` event before the first chunk falls
back like a status, after it the stream fails.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import aiohttp
import msgspec

from ..config import ProviderConfig, _Provider
from ..errors import InvalidRequest, UpstreamError
from ..policy import CLIENT_ERROR, retry_after, status_reason
from ..translate import anthropic_wire as aw
from ..translate.from_anthropic import ChunkMaker, decode_message, to_completion
from ..translate.to_anthropic import ChatIn, to_anthropic
from .base import Call, Completion
from .sse import iter_sse

ANTHROPIC_URL = "https://api.anthropic.com"
_error = msgspec.json.Decoder(aw.ErrorBody)


class AnthropicSpec(_Provider, tag="anthropic"):
    """Anthropic's Messages API; entries name Claude models (`claude-sonnet-4-5`, ...)."""

    base_url: str = ANTHROPIC_URL
    api_key: str | None = None
    headers: dict[str, str] = {}
    anthropic_version: str = "2023-06-01"
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 4096  # when the request sets none


def upstream_headers(pc: ProviderConfig) -> dict[str, str]:
    spec = pc.spec
    assert isinstance(spec, AnthropicSpec)
    headers = {"content-type": "application/json", "accept": "application/json"}
    headers.update(pc.headers)
    headers["anthropic-version"] = spec.anthropic_version
    if pc.api_key:
        headers["x-api-key"] = pc.api_key.reveal()
    return headers


class AnthropicProvider:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, AnthropicSpec)
        self.name = config.name
        self._spec = spec
        self._url = f"{spec.base_url.rstrip('/')}/v1/messages"
        self._secret = config.api_key.reveal() if config.api_key else ""
        self._headers = upstream_headers(config)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _body(self, call: Call, stream: bool) -> bytes:
        try:
            chat: ChatIn = call.request.decode(ChatIn)
            request = to_anthropic(chat, call.entry.model, self._spec.max_tokens, stream)
        except InvalidRequest as exc:  # the request is wrong for every provider
            raise UpstreamError(CLIENT_ERROR, exc.message, 400, param=exc.param) from None
        return aw.encode(request)

    def _post(self, call: Call, stream: bool) -> Any:
        entry = call.entry
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=entry.connect_timeout,
            sock_read=entry.timeout if stream else None,  # streams: the gap between events
        )
        headers = self._headers
        if call.request_id:
            headers = {**headers, "x-request-id": call.request_id}
        return self._client().post(
            self._url,
            data=self._body(call, stream),
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        )

    async def complete(self, call: Call) -> Completion:
        async with self._post(call, stream=False) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise self._status_error(resp.status, body, resp.headers)
        answer = to_completion(decode_message(body), call.entry.model)
        return Completion(aw.encode(answer), answer.usage)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        async with self._post(call, stream=True) as resp:
            if resp.status != 200:
                raise self._status_error(resp.status, await resp.read(), resp.headers)
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                raise UpstreamError("bad_response", f"expected an event stream, got '{ctype}'")
            maker = ChunkMaker(call.entry.model, call.request.include_usage)
            async for data in iter_sse(resp.content):
                for chunk in maker.feed(data):
                    yield chunk
                if maker.done:
                    return
        raise UpstreamError("bad_response", "Anthropic stream ended without message_stop")

    def _status_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        kind, message = error_fields(body)
        if self._secret:
            message = message.replace(self._secret, "********")
        if 300 <= status < 400:
            return UpstreamError("bad_response", f"redirect {status} not followed", status)
        err = UpstreamError(status_reason(status), message, status, retry_after(headers))
        if err.reason == CLIENT_ERROR:
            err.code = kind
        return err

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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


async def list_models(pc: ProviderConfig) -> set[str]:
    """The model ids `GET /v1/models` lists (raises on any failure)."""
    spec = pc.spec
    assert isinstance(spec, AnthropicSpec)
    timeout = aiohttp.ClientTimeout(
        total=spec.connect_timeout + 5, sock_connect=spec.connect_timeout
    )
    headers = upstream_headers(pc)
    url = f"{spec.base_url.rstrip('/')}/v1/models?limit=1000"
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=headers, allow_redirects=False) as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        listing = msgspec.json.decode(await resp.read(), type=_Models)
    return {m.id for m in listing.data}
