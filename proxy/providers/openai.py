"""Any OpenAI-compatible upstream (OpenAI, OpenRouter, vLLM, llama.cpp, Ollama's /v1).

The client's body goes out as it came, with only `model` rewritten, to the op's path
(`/chat/completions`, `/completions`, `/embeddings`); the answer comes back as the
upstream's bytes. One keep-alive pool (`upstream.Client`) per provider. Redirects are never
followed (a 3xx is the attempt's failure), bodies are read under a byte cap after
decompression, and only the configured headers go upstream, never the client's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from random import getrandbits

import msgspec

from ..config import BaseProviderSpec, ProviderConfig
from ..errors import UpstreamError
from ..policy import status_error
from ..reasons import Reason
from ..upstream import Client, Response
from ..wire import UsageView
from .base import Call, Completion, Op, Probe
from .http import Listing, get_json, read_capped, read_timeout
from .sse import iter_sse

_usage_decoder = msgspec.json.Decoder(UsageView)
_error_decoder = msgspec.json.Decoder(dict[str, object])
_JSON = "application/json"
_PATHS = {Op.CHAT: "/chat/completions", Op.COMPLETION: "/completions", Op.EMBEDDING: "/embeddings"}


class Spec(BaseProviderSpec, tag="openai"):
    """Any OpenAI-compatible endpoint: OpenAI, OpenRouter, vLLM, llama.cpp, Ollama's /v1."""

    base_url: str
    api_key: str | None = None
    headers: dict[str, str] = {}
    max_response_bytes: int = 64 * 1024 * 1024  # a non-stream answer, decompressed


class Adapter:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, Spec)
        self.name = config.name
        self._spec = spec
        self._secret = config.api_key.reveal() if config.api_key else ""
        self._headers = _headers(config)
        self._urls = {op: spec.base_url + path for op, path in _PATHS.items()}
        self._client: Client | None = None

    def _post(self, call: Call, stream: bool) -> Awaitable[Response]:
        entry = call.entry
        if self._client is None:
            self._client = Client(self._headers)
        return self._client.post(
            self._urls[call.op],
            call.request.body_for(entry.model),
            b"X-Request-Id: %s\r\n" % _uuid4(),  # our id, not the client's
            entry.connect_timeout,
            read_timeout(entry, stream),
        )

    async def complete(self, call: Call) -> Completion:
        async with await self._post(call, stream=False) as resp:
            body = await read_capped(resp, self._spec.max_response_bytes)
            if resp.status != 200:
                raise _status_error(resp.status, body, resp.headers)
        try:
            view = _usage_decoder.decode(body)
        except msgspec.DecodeError:
            raise UpstreamError("bad_response", "upstream answered 200 with invalid JSON") from None
        answer = view.data if call.op is Op.EMBEDDING else view.choices
        if not answer:
            if view.error:
                check_chunk(body)  # raises with the upstream's message
            raise UpstreamError("bad_response", "upstream answered 200 without an answer")
        return Completion(body, view.usage)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        if call.op is Op.EMBEDDING:
            raise UpstreamError("unsupported", "embeddings are not streamed")
        async with await self._post(call, stream=True) as resp:
            if resp.status != 200:
                body = await read_capped(resp, 1024 * 1024)
                raise _status_error(resp.status, body, resp.headers)
            ctype = resp.headers.get("Content-Type", "")
            if not ctype.startswith("text/event-stream"):
                raise UpstreamError("bad_response", f"expected an event stream, got '{ctype}'")
            first = True
            async for data in iter_sse(resp):
                if data == b"[DONE]":
                    return
                if b"\n" in data:  # a multi-line event: in JSON a line break is whitespace
                    data = data.replace(b"\n", b" ")
                if first or b'"error"' in data:
                    check_chunk(data)
                    first = False
                yield data
        raise UpstreamError("bad_response", "upstream stream ended without [DONE]")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _headers(config: ProviderConfig) -> dict[str, str]:
    headers = {"Content-Type": _JSON, "Accept": "application/json, text/event-stream"}
    headers.update(config.headers)
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key.reveal()}"
    return headers


async def probe(config: ProviderConfig) -> Probe:
    spec = config.spec
    assert isinstance(spec, Spec)
    body: Listing = await get_json(
        f"{spec.base_url}/models", _headers(config), spec.connect_timeout
    )
    return Probe(True, "reachable", {str(m.get("id")) for m in body.data})


def _status_error(status: int, body: bytes, headers: object) -> UpstreamError:
    message, param, code = upstream_error_fields(body)
    return status_error(status, message, headers, param, code)  # type: ignore[arg-type]


def check_chunk(data: bytes) -> None:
    """A chunk must be a JSON object; an `{"error": ...}` object is the upstream failing."""
    try:
        obj = _error_decoder.decode(data)
    except msgspec.DecodeError:
        raise UpstreamError("bad_response", "upstream chunk is not valid JSON") from None
    error = obj.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        raise UpstreamError(Reason.SERVER_ERROR, f"upstream error event: {message}")


def upstream_error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an upstream error body, OpenAI-shaped or not."""
    try:
        obj = _error_decoder.decode(body)
    except msgspec.DecodeError:
        text = body[:300].decode("utf-8", "replace").strip()
        return (text or "no body"), None, None
    if not isinstance(obj, dict):
        return str(obj)[:300], None, None
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


_UUID_KEEP = ~((0xF000 << 64) | (0xC000 << 48))  # version and variant bits cleared...
_UUID_SET = (0x4000 << 64) | (0x8000 << 48)  # ...then set: version 4, RFC 4122 variant


def _uuid4() -> bytes:
    """A random (version 4) UUID, as `str(uuid.uuid4())` spells it, at a fraction of its
    cost. It names the upstream call in the upstream's logs; it guards nothing."""
    h = b"%032x" % (getrandbits(128) & _UUID_KEEP | _UUID_SET)
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])
