"""An Ollama emulator following Ollama's API docs, on a real socket.

`POST /api/chat` streams NDJSON (`done: false` lines, then a final `done: true` line with
`done_reason`, token counts and nanosecond durations) or answers one object; errors are
`{"error": "..."}` bodies; `GET /api/tags` lists the pulled models. Every request is
recorded (`requests`; chat bodies also in `seen`; `active` counts those being answered
now). An `options.drip_ms` (the emulator's own) spaces the streamed lines by that many
milliseconds. The model picks a behaviour:

    echo          answers "echo: <last user text>" (+ " [images: N]" when images came);
                  any pulled model without a behaviour of its own does the same
    tools         calls the first tool; after a tool result answers "tool <name> said: <text>"
    long          answers 10 words, or stops at options.num_predict with done_reason length
    big           answers one 1 MB word in a single line
    status-<n>    answers <n> with {"error": ...} (503: Ollama's "server busy")
    error-first   streams an {"error": ...} line before any content
    error-mid     streams two words, then an {"error": ...} line
    truncated     streams two words, then ends without the done line
    bad-json      answers 200 with a body (or first line) that is not JSON
    not-pulled    (any model not in PULLED) answers 404 like an unpulled model

`POST /api/generate` (raw completions; bodies in `generated`) answers the same way, with
`response` deltas: echo says "echo: <prompt>", long/error-mid/truncated/status-<n>/
error-first/bad-json as above. `POST /api/embed` (bodies in `embedded`) answers `embed`
(and any pulled model): one unit vector per input, a function of its text, 8-dimensional
or `dimensions` long; an input over `EMBED_WINDOW` words is a 400 unless `truncate` is
true (Ollama's default); status-<n> and bad-json as above.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PULLED = ["echo:latest", "tools:latest", "long:latest", "big:latest", "error-first:latest",
          "error-mid:latest", "truncated:latest", "bad-json:latest", "status-400:latest",
          "status-500:latest", "status-503:latest", "embed:latest",
          "qwen2:1.5b-instruct"]  # the fast tier of the shipped models.yaml  # fmt: skip
BIG = "x" * 1_000_000  # over aiohttp's line limit (512 KiB in 3.14)
EMBED_WINDOW = 64  # words an embedding input may have
EMBED_DIMENSIONS = 8


def tagged(model: str) -> str:
    """A model name as /api/tags lists it: `name:tag`, the tag `latest` when left out."""
    return model if ":" in model else f"{model}:latest"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass
class FakeOllama:
    seen: list[dict[str, Any]] = field(default_factory=list)  # /api/chat bodies
    generated: list[dict[str, Any]] = field(default_factory=list)  # /api/generate bodies
    embedded: list[dict[str, Any]] = field(default_factory=list)  # /api/embed bodies
    requests: list[Seen] = field(default_factory=list)
    tags_status: int = 200  # anything else: /api/tags fails
    active: int = 0  # requests being answered right now

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._count])
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_post("/api/embed", self.embed)
        app.router.add_get("/api/tags", self.tags)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.active += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self.active -= 1

    def _record(self, request: web.Request) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Seen(request.path, headers))

    def chats(self, model: str) -> list[dict[str, Any]]:
        return [body for body in self.seen if body.get("model") == model]

    async def tags(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.tags_status != 200:
            return web.json_response({"error": "emulated tags failure"}, status=self.tags_status)
        models = [{"name": n, "model": n, "size": 1, "digest": "0" * 64,
                   "modified_at": "2026-01-01T00:00:00Z",
                   "details": {"format": "gguf", "family": "qwen2"}} for n in PULLED]  # fmt: skip
        return web.json_response({"models": models})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        body = await request.json()
        self.seen.append(body)
        name = str(body.get("model", ""))
        model = name.removesuffix(":latest")
        stream = body.get("stream", True)
        refused = _refusal(name)
        if refused is not None:
            return refused
        words, calls, reason = _answer(model, body)
        if not stream:
            line = _line(name, " ".join(words), done=True, reason=reason, body=body, words=words)
            if calls:
                line["message"]["tool_calls"] = calls
            return web.json_response(line)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        if model == "error-first":
            await _send(resp, {"error": "emulated failure before any content"})
            await resp.write_eof()
            return resp
        for i, word in enumerate(words):
            if model in ("error-mid", "truncated") and i == 2:
                if model == "error-mid":
                    await _send(resp, {"error": "an error was encountered while running the model"})
                await resp.write_eof()
                return resp
            await _send(resp, _line(name, word if i == 0 else " " + word))
            await asyncio.sleep((body.get("options") or {}).get("drip_ms", 0) / 1000)
        if calls:
            line = _line(name, "")
            line["message"]["tool_calls"] = calls
            await _send(resp, line)
        await _send(resp, _line(name, "", done=True, reason=reason, body=body, words=words))
        await resp.write_eof()
        return resp

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        body = await request.json()
        self.generated.append(body)
        name = str(body.get("model", ""))
        model = name.removesuffix(":latest")
        refused = _refusal(name)
        if refused is not None:
            return refused
        words = _generated_words(model, body)
        done = {"done": True, "done_reason": "stop", **_counts(str(body.get("prompt")), words)}
        limit = (body.get("options") or {}).get("num_predict")
        if limit is not None and 0 <= limit < len(words):
            words, done["done_reason"] = words[:limit], "length"
            done.update(_counts(str(body.get("prompt")), words))
        if not body.get("stream", True):
            return web.json_response(_generated(name, " ".join(words), done))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        if model == "error-first":
            await _send(resp, {"error": "emulated failure before any content"})
            await resp.write_eof()
            return resp
        for i, word in enumerate(words):
            if model in ("error-mid", "truncated") and i == 2:
                if model == "error-mid":
                    await _send(resp, {"error": "an error was encountered while running the model"})
                await resp.write_eof()
                return resp
            await _send(resp, _generated(name, word if i == 0 else " " + word))
            await asyncio.sleep(0)
        await _send(resp, _generated(name, "", done))
        await resp.write_eof()
        return resp

    async def embed(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        body = await request.json()
        self.embedded.append(body)
        name = str(body.get("model", ""))
        refused = _refusal(name)
        if refused is not None:
            return refused
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        size = int(body.get("dimensions") or EMBED_DIMENSIONS)
        words = 0
        for text in texts:
            n = len(text.split())
            if n > EMBED_WINDOW and not body.get("truncate", True):
                return web.json_response(
                    {"error": "the input length exceeds the context length"}, status=400
                )
            words += min(n, EMBED_WINDOW)
        return web.json_response({
            "model": name,
            "embeddings": [embedding(t, size) for t in texts],
            "total_duration": 2_000_000, "load_duration": 1_000_000,
            "prompt_eval_count": words,
        })  # fmt: skip


def embedding(text: str, size: int = EMBED_DIMENSIONS) -> list[float]:
    """The emulator's vector for a text: a unit vector that depends only on the text."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    raw = [((seed >> (i % 64)) & 0xFF) - 127.5 + i for i in range(size)]
    norm = math.sqrt(sum(x * x for x in raw))
    return [x / norm for x in raw]


def _refusal(name: str) -> web.Response | None:
    """The answer for a model that fails before any work (status-<n>, not pulled, bad-json)."""
    model = name.removesuffix(":latest")
    if model.startswith("status-"):
        status = int(model.split("-")[1])
        message = f"emulated {status}"
        if status == 503:
            message = "server busy, please try again.  maximum pending requests exceeded"
        return web.json_response({"error": message}, status=status)
    if tagged(name) not in PULLED:
        return web.json_response(
            {"error": f'model "{model}" not found, try pulling it first'}, status=404
        )
    if model == "bad-json":
        return web.Response(body=b"{not json\n", content_type="application/x-ndjson")
    return None


def _generated_words(model: str, body: dict[str, Any]) -> list[str]:
    if model in ("long", "error-mid", "truncated"):
        return [f"w{i}" for i in range(10)]
    return f"echo: {body.get('prompt', '')}".split(" ")


def _counts(prompt: str, words: list[str]) -> dict[str, int]:
    return {
        "total_duration": 5_000_000, "load_duration": 1_000_000,
        "prompt_eval_count": len(prompt.split()), "prompt_eval_duration": 1_000_000,
        "eval_count": len(words), "eval_duration": 3_000_000,
    }  # fmt: skip


def _generated(model: str, text: str, done: dict[str, Any] | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {
        "model": model,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()),
        "response": text,
        "done": False,
    }
    line.update(done or {})
    return line


def _answer(model: str, body: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], str]:
    messages = body.get("messages", [])
    last = messages[-1] if messages else {}
    if model == "tools":
        if last.get("role") == "tool":
            return f"tool {last.get('tool_name')} said: {last['content']}".split(), [], "stop"
        name = body["tools"][0]["function"]["name"]
        return [], [{"function": {"name": name, "arguments": {"city": "Paris"}}}], "stop"
    if model == "big":
        return [BIG], [], "stop"
    if model in ("long", "error-mid", "truncated"):
        limit = (body.get("options") or {}).get("num_predict")
        words = [f"w{i}" for i in range(10)]
        if limit is not None and limit < len(words):
            return words[:limit], [], "length"
        return words, [], "stop"
    user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    text = f"echo: {user.get('content', '')}"
    if user.get("images"):
        text += f" [images: {len(user['images'])}]"
    return text.split(" "), [], "stop"


def _line(
    model: str,
    content: str,
    done: bool = False,
    reason: str = "stop",
    body: dict[str, Any] | None = None,
    words: list[str] | None = None,
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "model": model,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()),
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        prompt = sum(len(str(m.get("content", "")).split()) for m in (body or {})["messages"])
        line.update(
            done_reason=reason, total_duration=5_000_000, load_duration=1_000_000,
            prompt_eval_count=prompt, prompt_eval_duration=1_000_000,
            eval_count=len(words or []), eval_duration=3_000_000,
        )  # fmt: skip
    return line


async def _send(resp: web.StreamResponse, obj: dict[str, Any]) -> None:
    await resp.write(json.dumps(obj).encode() + b"\n")
