"""Any OpenAI-compatible upstream (OpenAI, OpenRouter, vLLM, llama.cpp, Ollama's /v1).

The client's body goes out as it came, with only `model` rewritten; the answer comes
back as the upstream's bytes. One shared `aiohttp.ClientSession` per provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp
import msgspec

from ..config import ProviderConfig
from ..errors import UpstreamError
from ..policy import CLIENT_ERROR, retry_after, status_reason
from ..wire import UsageView
from .base import Call, Completion
from .sse import iter_sse

_usage_decoder = msgspec.json.Decoder(UsageView)
_error_decoder = msgspec.json.Decoder(dict[str, object])
_JSON = "application/json"


class OpenAIProvider:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        self.name = config.name
        self._url = f"{spec.base_url}/chat/completions"  # type: ignore[union-attr]
        self._secret = config.api_key.reveal() if config.api_key else ""
        headers = {"Content-Type": _JSON, "Accept": "application/json, text/event-stream"}
        headers.update(config.headers)
        if self._secret:
            headers["Authorization"] = f"Bearer {self._secret}"
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
            )
        return self._session

    def _post(self, call: Call, stream: bool):
        entry = call.entry
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=entry.connect_timeout,
            # Streams: the gap allowed between chunks once the first has come.
            sock_read=entry.timeout if stream else None,
        )
        headers = self._headers
        if call.request_id:
            headers = {**headers, "X-Request-Id": call.request_id}
        return self._client().post(
            self._url, data=call.request.body_for(entry.model), headers=headers, timeout=timeout
        )

    async def complete(self, call: Call) -> Completion:
        async with self._post(call, stream=False) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise self._status_error(resp.status, body, resp.headers)
        try:
            view = _usage_decoder.decode(body)
        except msgspec.DecodeError:
            raise UpstreamError("bad_response", "upstream answered 200 with invalid JSON") from None
        if not view.choices:
            if view.error:
                check_chunk(body)  # raises with the upstream's message
            raise UpstreamError("bad_response", "upstream answered 200 without choices")
        return Completion(body, view.usage)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        async with self._post(call, stream=True) as resp:
            if resp.status != 200:
                raise self._status_error(resp.status, await resp.read(), resp.headers)
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                raise UpstreamError("bad_response", f"expected an event stream, got '{ctype}'")
            first = True
            async for data in iter_sse(resp.content):
                if data == b"[DONE]":
                    return
                if b"\n" in data:  # a multi-line event: in JSON a line break is whitespace
                    data = data.replace(b"\n", b" ")
                if first or b'"error"' in data:
                    check_chunk(data)
                    first = False
                yield data
        raise UpstreamError("bad_response", "upstream stream ended without [DONE]")

    def _status_error(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
        message, param, code = upstream_error_fields(body)
        if self._secret:
            message = message.replace(self._secret, "********")
        err = UpstreamError(status_reason(status), message, status, retry_after(headers))
        if err.reason == CLIENT_ERROR:
            err.param, err.code = param, code
        return err

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def check_chunk(data: bytes) -> None:
    """A chunk must be a JSON object; an `{"error": ...}` object is the upstream failing."""
    try:
        obj = _error_decoder.decode(data)
    except msgspec.DecodeError:
        raise UpstreamError("bad_response", "upstream chunk is not valid JSON") from None
    error = obj.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamError("server_error", f"upstream error event: {message}")


def upstream_error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an upstream error body, OpenAI-shaped or not."""
    try:
        obj = _error_decoder.decode(body)
    except msgspec.DecodeError:
        text = body[:300].decode("utf-8", "replace").strip()
        return (text or "no body"), None, None
    error = obj.get("error", obj)
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or msgspec.json.encode(error).decode()
        param, code = error.get("param"), error.get("code")
        return (
            str(message),
            param if isinstance(param, str) else None,
            str(code) if isinstance(code, str | int) else None,
        )
    return str(error), None, None
