"""Ollama's native embeddings (`POST /api/embed`) and raw completions (`POST /api/generate`),
translated both ways; the Ollama adapter hands these two operations here.

Embeddings: `input` goes as a list of strings with `truncate` (the entry's; off by
default, so an input over the model's window is Ollama's 400, not silently cut) and
`dimensions` when asked; `embeddings` come back as OpenAI's `list` (float or base64),
`prompt_eval_count` as `usage.prompt_tokens`. Token-id inputs are `unsupported` (Ollama
takes text only).

Completions: one prompt goes to `/api/generate` with `raw: true` (no template: the prompt
is the model's whole input); sampling fields become `options` over the provider's own,
`max_tokens` (default 16) becomes `num_predict`. NDJSON `response` deltas become
`text_completion` chunks (the first is sent once the first text or the end is in, so a
failure before it still falls back), the final line's `done_reason` the
`finish_reason`, `prompt_eval_count`/`eval_count` the `usage`. `echo` sends the prompt back
first.

Errors: `{"error": "..."}` bodies map through `policy.status_reason` like `/api/chat`; an
error line before any text falls back, after it the stream fails; a stream without its
`done` line is `bad_response`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

import msgspec

from ..completions import RawPrompt, TextAnswer, completion_request, finish_reason, translatable
from ..config import Entry
from ..embeddings import EmbeddingRequest, embedding_list, embedding_request
from ..errors import InvalidRequest, UpstreamError
from ..policy import client_error, status_error
from ..reasons import Reason
from ..upstream import Client, Response
from ..wire import Usage, encode
from .base import Call, Completion, Op
from .http import read_capped, read_timeout

MAX_LINE = 16 * 1024 * 1024
MAX_BODY = 256 * 1024 * 1024  # a whole answer: 2048 embeddings of 4096 numbers fit
_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


class _Embedded(msgspec.Struct):
    embeddings: list[list[float]] | None = None
    prompt_eval_count: int | None = None
    error: Any = None


class _Generated(msgspec.Struct):
    """One NDJSON line of /api/generate (or the whole non-stream answer)."""

    response: str = ""
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: Any = None


_embedded = msgspec.json.Decoder(_Embedded)
_generated = msgspec.json.Decoder(_Generated)
_error = msgspec.json.Decoder(dict[str, Any])


class OllamaOps:
    """Embeddings and raw completions on one Ollama server, with the adapter's client (and
    so its headers) and options; `ready(entry)` runs first (the adapter's pulled check)."""

    def __init__(
        self,
        base_url: str,
        options: Mapping[str, Any],
        keep_alive: str | int | None,
        client: Callable[[], Client],
        ready: Callable[[Entry], Awaitable[None]] | None = None,
    ) -> None:
        self._embed_url = f"{base_url}/api/embed"
        self._generate_url = f"{base_url}/api/generate"
        self._options = dict(options)
        self._keep_alive = keep_alive
        self._client = client
        self._ready = ready

    async def complete(self, call: Call) -> Completion:
        """An embedding list or a text completion, as `call.op` asks."""
        try:
            if call.op is Op.EMBEDDING:
                checked = embedding_request(call.request)
                return await self.embed(checked, call.entry, call.entry.truncate)
            prompt = translatable(completion_request(call.request), "Ollama", tokens=False)
        except InvalidRequest as exc:  # the request is wrong for every provider
            raise client_error(exc.message, exc.param) from None
        return await self.generate(prompt, call.entry)

    async def stream(self, call: Call) -> AsyncGenerator[bytes, None]:
        """A streamed text completion (embeddings are never streamed)."""
        if call.op is not Op.COMPLETION:
            raise UpstreamError(Reason.UNSUPPORTED, f"Ollama does not stream {call.op}")
        try:
            prompt = translatable(completion_request(call.request), "Ollama", tokens=False)
        except InvalidRequest as exc:
            raise client_error(exc.message, exc.param) from None
        async with aclosing(
            self.generate_stream(prompt, call.entry, call.request.include_usage)
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- embeddings

    async def embed(self, request: EmbeddingRequest, entry: Entry, truncate: bool) -> Completion:
        if request.texts is None:
            raise UpstreamError("unsupported", "Ollama embeds text, not token ids", param="input")
        body: dict[str, Any] = {"model": entry.model, "input": request.texts, "truncate": truncate}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if self._options:
            body["options"] = dict(self._options)
        if self._keep_alive is not None:
            body["keep_alive"] = self._keep_alive
        async with await self._post(self._embed_url, body, entry, stream=False) as resp:
            raw = await read_capped(resp, MAX_BODY)
            if resp.status != 200:
                raise _status_error(resp.status, raw, resp.headers)
        try:
            answer = _embedded.decode(raw)
        except msgspec.DecodeError:
            raise UpstreamError("bad_response", "Ollama answered 200 with invalid JSON") from None
        if answer.error is not None:
            raise UpstreamError("server_error", f"Ollama error: {_error_text(answer.error)}")
        vectors = answer.embeddings
        if vectors is None or len(vectors) != len(request.texts):
            got = "no" if vectors is None else str(len(vectors))
            raise UpstreamError(
                "bad_response", f"Ollama answered {got} embeddings for {len(request.texts)} inputs"
            )
        tokens = answer.prompt_eval_count or 0
        out = embedding_list(vectors, entry.model, tokens, request.encoding_format)
        return Completion(encode(out), Usage(prompt_tokens=tokens, total_tokens=tokens))

    # -- raw completions

    async def generate(self, prompt: RawPrompt, entry: Entry) -> Completion:
        body = self._generate_body(prompt, entry, False)
        async with await self._post(self._generate_url, body, entry, stream=False) as resp:
            raw = await read_capped(resp, MAX_BODY)
            if resp.status != 200:
                raise _status_error(resp.status, raw, resp.headers)
        line = _decode_line(raw)
        if not line.done:
            raise UpstreamError("bad_response", "Ollama answered 200 without done: true")
        usage = _usage(line)
        text = _echo(prompt) + line.response
        answer = TextAnswer.new(entry.model).body(text, finish_reason(line.done_reason), usage)
        return Completion(answer, usage)

    async def generate_stream(
        self, prompt: RawPrompt, entry: Entry, include_usage: bool
    ) -> AsyncGenerator[bytes, None]:
        answer = TextAnswer.new(entry.model)
        body = self._generate_body(prompt, entry, True)
        async with await self._post(self._generate_url, body, entry, stream=True) as resp:
            if resp.status != 200:
                raise _status_error(resp.status, await read_capped(resp, MAX_LINE), resp.headers)
            started = False
            async with aclosing(_ndjson(resp)) as lines:
                async for line in lines:
                    if not started and (line.response or line.done):
                        started = True  # committed: from here on a failure ends the stream
                        if prompt.echo:
                            yield answer.chunk(_echo(prompt))
                    if line.response:
                        yield answer.chunk(line.response)
                    if line.done:
                        yield answer.chunk("", finish_reason(line.done_reason))
                        if include_usage:
                            yield answer.usage_chunk(_usage(line))
                        return
        raise UpstreamError("bad_response", "Ollama stream ended without its done line")

    def _generate_body(self, prompt: RawPrompt, entry: Entry, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": entry.model,
            "prompt": prompt.prompt,
            "raw": True,
            "stream": stream,
        }
        options = dict(self._options)
        for name in _SAMPLING:
            value = getattr(prompt, name)
            if value is not None:
                options[name] = value
        options["num_predict"] = prompt.max_tokens
        if prompt.stops:
            options["stop"] = list(prompt.stops)
        body["options"] = options
        if self._keep_alive is not None:
            body["keep_alive"] = self._keep_alive
        return body

    async def _post(self, url: str, body: dict[str, Any], entry: Entry, stream: bool) -> Response:
        if self._ready is not None:
            await self._ready(entry)
        return await self._client().post(
            url, encode(body), b"", entry.connect_timeout, read_timeout(entry, stream)
        )


def _echo(prompt: RawPrompt) -> str:
    return prompt.prompt if prompt.echo and isinstance(prompt.prompt, str) else ""


def _usage(line: _Generated) -> Usage:
    prompt, completion = line.prompt_eval_count or 0, line.eval_count or 0
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _ndjson(content: Response) -> AsyncGenerator[_Generated, None]:
    """The stream's lines, decoded; an `{"error": ...}` line raises."""
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


def _decode_line(raw: bytes) -> _Generated:
    try:
        line = _generated.decode(raw)
    except msgspec.DecodeError:
        raise UpstreamError("bad_response", "Ollama sent a line that is not JSON") from None
    if line.error is not None:
        raise UpstreamError("server_error", f"Ollama error: {_error_text(line.error)}")
    return line


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or encode(error).decode())
    return str(error)


def _status_error(status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamError:
    try:
        obj = _error.decode(body)
        message = _error_text(obj.get("error", ""))
    except msgspec.DecodeError:
        message = body[:300].decode("utf-8", "replace").strip()
    return status_error(status, message, headers)
