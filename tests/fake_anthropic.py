"""A fake of Anthropic's Messages API following its docs, on a real socket.

`POST /v1/messages` answers a `message` object, or (with `"stream": true`) the documented
event stream: `message_start`, `content_block_start`, `ping`, `content_block_delta`
(`text_delta` / `input_json_delta`), `content_block_stop`, `message_delta` (stop reason,
output tokens), `message_stop`, each as `event: <type>` + `data: <json>`. Errors are
`{"type": "error", "error": {"type", "message"}}` with Anthropic's statuses and a
`request-id` header. `GET /v1/models` lists the models. A request needs
`anthropic-version`, and its key (`x-api-key`, or `Authorization: Bearer` as newer SDKs
send it) equal to `api_key` when one is set. Every request is
recorded (`seen`: path, lower-cased headers, body). The model picks a behaviour:

    echo (any other)  answers "echo: <last user text>" (+ " [images: N]"), word by word;
                      stops at the first of `stop_sequences` it meets (stop_sequence),
                      or after `max_tokens` words (max_tokens)
    tools             calls the first tool with {"city": "Paris"} (tool_use); after a
                      tool_result answers "tool <id> said: <result text>"
    status-<n>        answers <n> with Anthropic's error body (429: retry-after 7;
                      529: overloaded_error)
    error-mid         streams two words, then an `error` event (overloaded_error)
    truncated         streams two words, then ends without message_delta/message_stop
    slow              answers like echo, its stream's events `DRIP` seconds apart

`active` counts the requests being answered right now.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MODELS = ["claude-echo", "tools", "error-mid", "truncated"]
DRIP = 0.5  # seconds between the stream events of model "slow"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeAnthropic:
    api_key: str | None = None
    seen: list[Seen] = field(default_factory=list)
    active: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._count])
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models", self.models)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.active += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self.active -= 1

    def _check(self, request: web.Request) -> web.Response | None:
        if request.headers.get("anthropic-version") is None:
            return error(400, "anthropic-version: header is required")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        key = request.headers.get("x-api-key") or bearer
        if self.api_key is not None and key != self.api_key:
            return error(401, "invalid x-api-key")
        return None

    async def models(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, _headers(request), {}))
        failed = self._check(request)
        if failed is not None:
            return failed
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"}
            for m in MODELS
        ]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": MODELS[0], "last_id": MODELS[-1]}
        )

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(Seen(request.path, _headers(request), body))
        failed = self._check(request)
        if failed is not None:
            return failed
        if not isinstance(body.get("max_tokens"), int):
            return error(400, "max_tokens: Field required")
        model = str(body.get("model", ""))
        if model.startswith("status-"):
            return error(int(model.removeprefix("status-")), f"fake status {model}")
        blocks, stop_reason, stop_sequence = _answer(model, body)
        usage = {"input_tokens": _input_tokens(body), "output_tokens": _output_tokens(blocks)}
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {**usage, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": "req_fake"})
        return await self._stream(request, message, model)

    async def _stream(
        self, request: web.Request, message: dict[str, Any], model: str
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "request-id": "req_fake"}
        )
        await resp.prepare(request)

        async def send(kind: str, data: dict[str, Any]) -> None:
            await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())
            await asyncio.sleep(DRIP if model == "slow" else 0)

        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {**message["usage"], "output_tokens": 1}
        await send("message_start", {"type": "message_start", "message": start})
        for index, block in enumerate(message["content"]):
            empty = {**block, "text": ""} if block["type"] == "text" else {**block, "input": {}}
            await send(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": empty},
            )
            if index == 0:
                await send("ping", {"type": "ping"})
            for n, delta in enumerate(_deltas(block)):
                if n == 2 and model in ("error-mid", "truncated"):
                    if model == "error-mid":
                        info = {"type": "overloaded_error", "message": "Overloaded"}
                        await send("error", {"type": "error", "error": info})
                    await resp.write_eof()
                    return resp
                await send(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": stop,
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp


def error(status: int, message: str) -> web.Response:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    headers = {"request-id": "req_fake"}
    if status == 429:
        headers["retry-after"] = "7"
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def _headers(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


def _answer(model: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str, str | None]:
    last = body["messages"][-1]
    results = [
        b for b in _blocks(last) if b.get("type") == "tool_result" and last["role"] == "user"
    ]
    if model == "tools" and not results and body.get("tools"):
        call = {
            "type": "tool_use",
            "id": f"toolu_{uuid.uuid4().hex[:24]}",
            "name": body["tools"][0]["name"],
            "input": {"city": "Paris"},
        }
        return [{"type": "text", "text": "Let me check."}, call], "tool_use", None
    if results:
        result = results[0]
        text = f"tool {result['tool_use_id']} said: {_text(result.get('content'))}"
    else:
        text = "echo: " + _text(last.get("content"))
        images = sum(1 for b in _blocks(last) if b.get("type") == "image")
        if images:
            text += f" [images: {images}]"
    words = text.split(" ")
    for stop in body.get("stop_sequences") or []:
        if stop in text:
            return [{"type": "text", "text": text[: text.index(stop)]}], "stop_sequence", stop
    if len(words) > body["max_tokens"]:
        return [{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens", None
    return [{"type": "text", "text": text}], "end_turn", None


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content or [] if b.get("type") == "text")


def _deltas(block: dict[str, Any]) -> list[dict[str, Any]]:
    if block["type"] == "text":
        words = block["text"].split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return [{"type": "text_delta", "text": p} for p in pieces if p]
    data = json.dumps(block["input"])
    return [
        {"type": "input_json_delta", "partial_json": data[i : i + 5]}
        for i in range(0, len(data), 5)
    ]


def _input_tokens(body: dict[str, Any]) -> int:
    return sum(len(_text(m.get("content")).split()) for m in body["messages"]) + 1


def _output_tokens(blocks: list[dict[str, Any]]) -> int:
    return sum(len(b.get("text", json.dumps(b.get("input"))).split()) for b in blocks)
