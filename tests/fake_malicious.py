"""A malicious OpenAI-compatible upstream, over a real socket, for the hardening tests.

`POST /v1/chat/completions`; the requested `model` picks the attack:

    echo                 an honest answer (usage included), so the fake is usable at all
    redirect-<code>      <code> (301/302/303/307/308) to the `Sink` server's URL
    gzip-bomb            200, `Content-Encoding: gzip`, ~200 KB inflating to `BOMB_BYTES`
                         (stream requests: the same bomb as an SSE body)
    huge                 200 JSON without content-length that never ends (until the
                         client leaves or `HUGE_CAP` bytes); stream: one endless SSE line
    echo-error-<code>    <code> with an OpenAI error body that echoes every credential-ish
                         header it received in every field: message, type, param, code and
                         nested objects
    echo-error-stream    200 SSE whose first event is that error (and a second one after
                         a chunk, for a stream already committed)
    error-200            200 whose JSON body is `{"error": ...}` echoing the credentials
    partial              headers, half a JSON body, then silence (until the client leaves)
    silent               headers (SSE for a stream), then nothing (until the client leaves)
    usage-<kind>         an honest answer with absurd usage: negative | huge | string

`headers_seen` keeps each request's headers; `active` counts handlers running now and
`sent_bytes` what `huge` has written so far.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOMB_BYTES = 256 * 1024 * 1024
HUGE_CAP = 2 * 1024 * 1024 * 1024
_PLAIN_HEADERS = frozenset(
    {"host", "content-length", "content-type", "accept", "accept-encoding", "user-agent",
     "connection", "x-request-id", "traceparent"}
)  # fmt: skip


def _bomb() -> bytes:
    """gzip of BOMB_BYTES zero bytes, built chunk by chunk (never in memory whole)."""
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1024 * 1024)
    parts = [gz.compress(zeros) for _ in range(BOMB_BYTES // len(zeros))]
    parts.append(gz.flush())
    return b"".join(parts)


@dataclass
class Sink:
    """Where the redirects point: records every request that reaches it."""

    hits: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.record)
        return app

    async def record(self, request: web.Request) -> web.Response:
        self.hits.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": await request.read(),
            }
        )
        return web.json_response(_completion("sink", "the sink answered"))


@dataclass
class FakeMalicious:
    sink_url: str = ""
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    active: int = 0
    sent_bytes: int = 0
    _bomb: bytes = b""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    @property
    def bomb(self) -> bytes:
        if not self._bomb:
            self._bomb = _bomb()
        return self._bomb

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.headers_seen.append(headers)
        self.active += 1
        try:
            return await self._behave(request, body, str(body.get("model", "")), headers)
        finally:
            self.active -= 1

    async def _behave(
        self, request: web.Request, body: dict[str, Any], model: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        kind, _, arg = model.partition("-")
        if kind == "redirect":
            target = f"{self.sink_url}/v1/chat/completions"
            return web.Response(status=int(arg), headers={"Location": target})
        if model == "gzip-bomb":
            content_type = "text/event-stream" if stream else "application/json"
            return web.Response(
                body=self.bomb,
                headers={"Content-Encoding": "gzip", "Content-Type": content_type},
            )
        if model == "huge":
            return await self._endless(request, stream)
        if model == "echo-error-stream":
            return await self._sse(request, [_echo_error(headers), _chunk(model, "x")], stream)
        if kind == "echo" and arg.startswith("error-"):
            return web.json_response(_echo_error(headers), status=int(arg[6:]))
        if model == "error-200":
            return web.json_response(_echo_error(headers))
        if model == "partial":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b'{"id": "chatcmpl-partial", "choices": [')
            await asyncio.sleep(3600)
            return resp
        if model == "silent":
            content_type = "text/event-stream" if stream else "application/json"
            resp = web.StreamResponse(headers={"Content-Type": content_type})
            await resp.prepare(request)
            await asyncio.sleep(3600)
            return resp
        usage = _usage_of(arg) if kind == "usage" else {"prompt_tokens": 2, "completion_tokens": 2}
        if stream:
            final = {**_chunk(model, ""), "choices": [], "usage": usage}
            return await self._sse(request, [_chunk(model, "echo"), final], True)
        return web.json_response({**_completion(model, "echo"), "usage": usage})

    async def _endless(self, request: web.Request, stream: bool) -> web.StreamResponse:
        content_type = "text/event-stream" if stream else "application/json"
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)  # chunked: no content-length
        block = b" " * (1024 * 1024)
        await resp.write(b'data: {"x": "' if stream else b'{"x": "')
        while self.sent_bytes < HUGE_CAP:
            await resp.write(block)
            self.sent_bytes += len(block)
        return resp

    async def _sse(
        self, request: web.Request, events: list[dict[str, Any]], stream: bool
    ) -> web.StreamResponse:
        if not stream:
            return web.json_response(events[0])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(b"data: %b\n\n" % json.dumps(event).encode())
        if "error" in events[0]:  # once more after a chunk: a committed stream's error
            await resp.write(b"data: %b\n\n" % json.dumps(events[0]).encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _secrets_in(headers: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in headers.items() if k not in _PLAIN_HEADERS)


def _echo_error(headers: dict[str, str]) -> dict[str, Any]:
    """An error body with the received credentials in every field an upstream might use."""
    leak = _secrets_in(headers) + "\nERROR omnimind forged log line"
    auth = headers.get("authorization", "")
    return {
        "error": {
            "message": f"Incorrect API key provided: {leak}",
            "type": f"invalid_request_error {auth}",
            "param": f"key {auth} {headers.get('x-api-key', '')}",
            "code": f"bad_key_{auth}",
            "details": {"received": leak, "list": [auth, leak]},
            "metadata": {"raw": json.dumps(headers)},
        }
    }


def _usage_of(kind: str) -> dict[str, Any]:
    return {
        "negative": {"prompt_tokens": -5, "completion_tokens": -1000, "total_tokens": -1005},
        "huge": {"prompt_tokens": 10**15, "completion_tokens": 10**18, "total_tokens": 10**18},
        "string": {"prompt_tokens": "many", "completion_tokens": None, "total_tokens": "x"},
    }[kind]


def _chunk(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mal",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }


def _completion(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mal",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
