"""A fake OpenAI-compatible upstream that speaks the real wire protocol over a real socket.

Routes: `POST /{tag}/v1/chat/completions`, where `tag` names the configured provider
(so a test sees which provider was called). The requested `model` picks a behaviour:

    echo                 answers "echo: <last user text>" (streamed word by word)
    status-<code>        answers <code> with an OpenAI error body (429 adds Retry-After: 7)
    context-length       answers 400 as OpenAI does to a prompt over the model's window
    llamacpp-500         answers 500 with a llama.cpp-style error whose message is long
    hang                 never answers (until the client goes away)
    slow-<ms>            waits <ms> before the headers, then echoes
    slow-first-<ms>      sends headers at once, the first chunk after <ms> (non-stream: waits)
    drip-<n>-<ms>        streams n chunks, <ms> apart
    bad-json             200 with a body (or first chunk) that is not JSON
    not-sse              200 JSON even for a stream request
    reset                closes the connection before any response
    reset-mid            streams two chunks, then closes the connection (non-stream: cut body)
    no-done              streams the answer but never sends [DONE] (non-stream: cut body)
    error-first          streams an {"error": ...} event first
    error-mid            streams two chunks, then an {"error": ...} event (non-stream: 200
                         with an error body, as some upstreams do)
    keepalive            streams SSE comments (": OPENROUTER PROCESSING") between chunks
    ragged               streams the echo answer in legal but unusual SSE framing: CRLF and
                         lone-CR line ends, `data:` without its space, an `event:` field,
                         comments, one chunk's JSON over two `data:` lines, all written a
                         few bytes at a time (so reads split lines, events and CRLFs)
    empty-stream         sends [DONE] with no chunk before it
    tools                answers with a tool call to the first tool in the request
    json                 answers JSON text (also streamed): an instance of the request's
                         `response_format` json_schema, filled with canned values (city
                         Paris, country France, ...); without a schema {"city": "Paris",
                         "country": "France"}

`POST /{tag}/v1/completions` (legacy text completions) answers "echo: <prompt>" as a
`text_completion` (streamed word by word, `echo` and `include_usage` honoured; several
prompts give one choice each) and `POST /{tag}/v1/embeddings` one unit vector per input
(8 numbers, or `dimensions`; `base64` as OpenAI encodes it; token arrays accepted).
Both share status-<code>, hang, slow-<ms>, bad-json, reset and (completions) reset-mid,
no-done and error-mid with the chat route.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Seen:
    tag: str
    model: str
    headers: dict[str, str]  # names lower-cased
    body: dict[str, Any]


@dataclass
class FakeOpenAI:
    seen: list[Seen] = field(default_factory=list)
    active: int = 0  # requests whose handler is running right now

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tag}/v1/chat/completions", self.chat)
        app.router.add_post("/{tag}/v1/completions", self.completions)
        app.router.add_post("/{tag}/v1/embeddings", self.embeddings)
        app.router.add_get("/{tag}/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        names = ["echo", "tools", "hang"]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]
        return web.json_response({"object": "list", "data": data})

    def calls(self, tag: str | None = None) -> list[Seen]:
        return [s for s in self.seen if tag is None or s.tag == tag]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tag = request.match_info["tag"]
        model = body.get("model", "")
        self.seen.append(Seen(tag, model, {k.lower(): v for k, v in request.headers.items()}, body))
        self.active += 1
        try:
            return await self._behave(request, body, model)
        finally:
            self.active -= 1

    async def _record(self, request: web.Request) -> tuple[dict[str, Any], str]:
        body = await request.json()
        model = body.get("model", "")
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append(Seen(request.match_info["tag"], model, headers, body))
        return body, model

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._record(request)
        failed = await self._fail(request, model)
        if failed is not None:
            return failed
        stream = bool(body.get("stream"))
        if model == "bad-json":
            if stream:
                return await self._sse(request, [b"{not json"], done=True)
            return web.Response(body=b"{not json", content_type="application/json")
        prompts = body.get("prompt")
        prompts = (
            prompts
            if isinstance(prompts, list) and isinstance(prompts[0], str)
            else [prompts if isinstance(prompts, str) else f"<{len(prompts)} tokens>"]
        )
        texts = [("" if not body.get("echo") else p) + "echo: " + p for p in prompts]
        if not stream:
            return web.json_response(_text_completion(model, texts, body))
        words = texts[0].split(" ")
        chunks = [_text_chunk(model, w if i == 0 else " " + w) for i, w in enumerate(words)]
        chunks.append(_text_chunk(model, "", "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = _text_completion(model, texts, body)["usage"]
            chunks.append({**_text_chunk(model, ""), "choices": [], "usage": usage})
        data = [json.dumps(c).encode() for c in chunks]
        if model == "reset-mid":
            return await self._sse(request, data[:2], done=False, abort=True)
        if model == "no-done":
            return await self._sse(request, data, done=False)
        if model == "error-mid":
            return await self._sse(request, data[:2] + [_error_event()], done=False)
        return await self._sse(request, data, done=True)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, model = await self._record(request)
        failed = await self._fail(request, model)
        if failed is not None:
            return failed
        if model == "bad-json":
            return web.Response(body=b"{not json", content_type="application/json")
        inputs = body["input"]
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        size = int(body.get("dimensions") or 8)
        data = []
        for i, item in enumerate(inputs):
            vector = fake_vector(item if isinstance(item, str) else json.dumps(item), size)
            value: Any = vector
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    async def _fail(self, request: web.Request, model: str) -> web.StreamResponse | None:
        """The behaviours every route shares: errors, hangs, delays, resets."""
        _, _, arg = model.partition("-")
        if model.startswith("status-"):
            return _status(request, int(arg))
        if model == "hang":
            await asyncio.sleep(3600)
        if model.startswith("slow-") and not model.startswith("slow-first-"):
            await asyncio.sleep(int(arg) / 1000)
        if model == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        return None

    async def _behave(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        stream = bool(body.get("stream"))
        kind, _, arg = model.partition("-")
        if model.startswith("status-"):
            return _status(request, int(arg))
        if model == "hang":
            await asyncio.sleep(3600)
        if model.startswith("slow-") and not model.startswith("slow-first-"):
            await asyncio.sleep(int(arg) / 1000)
        if model == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if not stream and model.startswith("slow-first-"):
            await asyncio.sleep(int(arg[6:]) / 1000)
        if not stream and model in ("reset-mid", "no-done"):  # a truncated body
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 400
            await resp.prepare(request)
            await resp.write(b'{"id": "chatcmpl-fake", "choices": [')
            assert request.transport is not None
            request.transport.abort()
            return resp
        if not stream and model == "error-mid":  # some upstreams say 200 with an error body
            return web.Response(body=_error_event(), content_type="application/json")
        if model in CANNED_ERRORS:
            status, error = CANNED_ERRORS[model]
            return web.json_response({"error": error}, status=status)
        if model == "bad-json":
            if stream:
                return await self._sse(request, [b"{not json"], done=True)
            return web.Response(body=b"{not json", content_type="application/json")
        text = "echo: " + _last_user_text(body)
        if model == "json":
            text = json.dumps(_json_answer(body))
        if model == "tools":
            return await self._tool_call(request, body, stream)
        if not stream or model == "not-sse":
            return web.json_response(_completion(model, text, body))
        chunks = [json.dumps(c).encode() for c in _chunks(model, text, body)]
        if model.startswith("slow-first-"):
            return await self._sse(request, chunks, done=True, first_delay=int(arg[6:]) / 1000)
        if model.startswith("drip-"):
            n, _, ms = arg.partition("-")
            drip = [
                json.dumps(_chunk(model, {"content": f"{i} "}, None)).encode()
                for i in range(int(n))
            ]
            return await self._sse(request, drip, done=True, gap=int(ms) / 1000)
        if model == "empty-stream":
            return await self._sse(request, [], done=True)
        if model == "reset-mid":
            return await self._sse(request, chunks[:2], done=False, abort=True)
        if model == "no-done":
            return await self._sse(request, chunks, done=False)
        if model == "error-first":
            return await self._sse(request, [_error_event()] + chunks, done=True)
        if model == "error-mid":
            return await self._sse(request, chunks[:2] + [_error_event()], done=False)
        if model == "keepalive":
            return await self._sse(request, chunks, done=True, comments=True)
        if model == "ragged":
            return await self._ragged(request, chunks)
        return await self._sse(request, chunks, done=True)

    async def _sse(
        self,
        request: web.Request,
        chunks: list[bytes],
        *,
        done: bool,
        first_delay: float = 0,
        gap: float = 0,
        abort: bool = False,
        comments: bool = False,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if first_delay:
                await asyncio.sleep(first_delay)
            for i, chunk in enumerate(chunks):
                if gap and i:
                    await asyncio.sleep(gap)
                if comments:
                    await resp.write(b": OPENROUTER PROCESSING\n\n")
                await resp.write(b"data: " + chunk + b"\n\n")
            if abort:
                assert request.transport is not None
                request.transport.abort()
                return resp
            if done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the caller (the gateway) closed the stream: what a real upstream sees too
        return resp

    async def _ragged(self, request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
        ends = [b"\r\n", b"\n", b"\r"]
        wire = b": hello\r\n\r\n"
        for i, chunk in enumerate(chunks):
            end = ends[i % 3]
            if i == 1:  # one event's data over two lines, joined by LF it is the same JSON
                head, _, rest = chunk.partition(b",")
                wire += b"event: message" + end + b"data:" + head + b"," + end
                wire += b"data: " + rest + end + end
            elif i == 2:
                wire += b"data:" + chunk + end + end  # no space after the colon
            else:
                wire += b"data: " + chunk + end + end
            wire += b": keep-alive" + end + end
        wire += b"data: [DONE]\r\n\r\n"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for at in range(0, len(wire), 7):
            await resp.write(wire[at : at + 7])
            await asyncio.sleep(0.0005)  # separate TCP segments: the reader sees the splits
        await resp.write_eof()
        return resp

    async def _tool_call(
        self, request: web.Request, body: dict[str, Any], stream: bool
    ) -> web.StreamResponse:
        name = body["tools"][0]["function"]["name"]
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": name, "arguments": '{"city": "Paris"}'},
        }
        if not stream:
            answer = _completion(body["model"], None, body)
            answer["choices"][0]["message"]["tool_calls"] = [call]
            answer["choices"][0]["finish_reason"] = "tool_calls"
            return web.json_response(answer)
        chunks = [
            _chunk(
                body["model"],
                {"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]},
                None,
            ),
            _chunk(body["model"], {}, "tool_calls"),
        ]
        return await self._sse(request, [json.dumps(c).encode() for c in chunks], done=True)


def _status(request: web.Request, status: int) -> web.Response:
    headers = {"Retry-After": "7"} if status == 429 else {}
    message = f"fake upstream says {status}"
    if status == 401:  # like OpenAI, echo the credential it got
        message += f": incorrect key {request.headers.get('Authorization', '')}"
    error = {"message": message, "type": "fake", "param": None, "code": f"fake_{status}"}
    return web.json_response({"error": error}, status=status, headers=headers)


def fake_vector(text: str, size: int = 8) -> list[float]:
    """The fake's embedding of a text: a unit vector that depends only on the text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    raw = [((seed >> (i % 64)) & 0xFF) - 127.5 + i for i in range(size)]
    norm = math.sqrt(sum(x * x for x in raw))
    return [x / norm for x in raw]


def _text_completion(model: str, texts: list[str], body: dict[str, Any]) -> dict[str, Any]:
    prompts = body.get("prompt")
    prompt = len(str(prompts).split())
    completion = sum(len(t.split()) for t in texts)
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"text": t, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, t in enumerate(texts)
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def _text_chunk(model: str, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "model": model,
    }


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
            return str(content)
    return ""


_CANNED: dict[str, Any] = {"city": "Paris", "country": "France"}


def _json_answer(body: dict[str, Any]) -> Any:
    """What a model honouring `response_format` would say: the schema's shape, canned values."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") != "json_schema":
        return dict(_CANNED)
    schema = fmt["json_schema"].get("schema") or {}
    return _instance(schema, schema.get("$defs", {}), "")


def _instance(schema: dict[str, Any], defs: dict[str, Any], name: str) -> Any:
    if "$ref" in schema:
        return _instance(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, name)
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _instance(options[0], defs, name)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _instance(v, defs, k) for k, v in props.items()}
    if kind == "array":
        return [_instance(schema.get("items", {}), defs, name)]
    return {
        "string": _CANNED.get(name, name or "text"),
        "integer": 1,
        "number": 1.5,
        "boolean": True,
    }.get(kind)


def _usage(body: dict[str, Any], text: str | None) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion = len((text or "").split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion(model: str, text: str | None, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(body, text),
    }


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _chunks(model: str, text: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    words = text.split(" ")
    out = [_chunk(model, {"role": "assistant", "content": ""}, None)]
    out += [_chunk(model, {"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)]
    out.append(_chunk(model, {}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append({**_chunk(model, {}, None), "choices": [], "usage": _usage(body, text)})
    return out


def _error_event() -> bytes:
    return json.dumps(
        {
            "error": {
                "message": "fake upstream failed mid-stream",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    ).encode()


# Errors as real upstreams word them (OpenAI; llama.cpp's server validating a request).
CANNED_ERRORS: dict[str, tuple[int, dict[str, Any]]] = {
    "context-length": (400, {
        "message": "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9000 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
    }),
    "llamacpp-500": (500, {
        "code": 500, "type": "server_error",
        "message": "Failed to parse messages: Unsupported content part type: \"input_audio\" "
        + "(the chat template of this model only accepts text parts) " * 4,
    }),
}  # fmt: skip
