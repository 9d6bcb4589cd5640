"""The exact response cache: its key, when a client bypasses it, and streamed replays.

The key is a hash of the alias, the operation and every request field that shapes the
answer, each re-encoded with sorted object keys (so `{"a":1,"b":2}` and `{"b":2,"a":1}`
hit the same entry). Fields that only shape the delivery or the bookkeeping are left out:
`stream`, `stream_options`, `user`, `metadata`, `store`, and the like. The entries
themselves live in the state store (`proxy/state/`): in-process, or shared through Redis.

What is stored is the non-stream answer body (usage included). A streamed request is
answered from it by `replay()`, which turns a `chat.completion` into the
`chat.completion.chunk` payloads a stream would have carried; `Assembler` does the
reverse, so a streamed miss can fill the cache too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from .config import CacheSpec

HEADER = "x-omnimind-cache"
MAX_ENTRY_BYTES = 1 << 20  # a larger answer is served, not kept
# Request fields that do not change the answer's content.
IGNORED = frozenset(
    {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier",
     "safety_identifier", "prompt_cache_key", "prompt_cache_retention"}
)  # fmt: skip

_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder(order="sorted").encode
_plain = msgspec.json.Encoder().encode


def cache_key(alias: str, fields: Mapping[str, msgspec.Raw | bytes], op: str = "chat") -> str:
    """`<alias>/<hash>`: the same for every request whose answer would be the same."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(_plain([op, alias]))
    for name in sorted(fields):
        if name not in IGNORED:
            digest.update(_plain(name))
            digest.update(_encode(_decode.decode(fields[name])))
    return f"{alias}/{digest.hexdigest()}"


def bypass(cache_control: str | None) -> bool:
    """True when the client asked for a fresh answer (`no-cache`) or none kept (`no-store`)."""
    if not cache_control:
        return False
    words = {w.strip().lower() for w in cache_control.split(",")}
    return bool(words & {"no-cache", "no-store"})


def storable(cache_control: str | None) -> bool:
    return not cache_control or "no-store" not in cache_control.lower()


def spec_for(caches: Mapping[str, CacheSpec], alias: str) -> CacheSpec | None:
    return caches.get(alias)


# ---- replaying a cached answer as a stream ----------------------------------------------


class _Message(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message = msgspec.field(default_factory=_Message)
    finish_reason: str | None = "stop"


class _Completion(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[_Choice] = []
    usage: dict[str, Any] | None = None
    system_fingerprint: str | None = None


def _chunk(c: _Completion, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
        "choices": choices,
    }  # fmt: skip
    if c.system_fingerprint is not None:
        body["system_fingerprint"] = c.system_fingerprint
    body.update(extra)
    return _plain(body)


def replay(body: bytes, include_usage: bool = False) -> list[bytes]:
    """The `chat.completion.chunk` payloads (no `data: ` framing) of a cached answer."""
    c = msgspec.json.decode(body, type=_Completion)
    out = []
    for ch in c.choices:
        delta: dict[str, Any] = {"role": ch.message.role, "content": ch.message.content}
        if ch.message.tool_calls:
            delta["tool_calls"] = [{"index": i, **t} for i, t in enumerate(ch.message.tool_calls)]
        if ch.message.refusal is not None:
            delta["refusal"] = ch.message.refusal
        out.append(_chunk(c, [{"index": ch.index, "delta": delta, "logprobs": None,
                               "finish_reason": None}]))  # fmt: skip
        out.append(_chunk(c, [{"index": ch.index, "delta": {}, "logprobs": None,
                               "finish_reason": ch.finish_reason}]))  # fmt: skip
    if include_usage and c.usage is not None:
        out.append(_chunk(c, [], usage=c.usage))
    return out


# ---- assembling a streamed answer into a cacheable one ----------------------------------


class _DeltaCall(msgspec.Struct):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: dict[str, Any] | None = None


class _Delta(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    tool_calls: list[_DeltaCall] | None = None


class _ChunkChoice(msgspec.Struct):
    index: int = 0
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    id: str = ""
    created: int = 0
    model: str = ""
    choices: list[_ChunkChoice] = []
    usage: dict[str, Any] | None = None
    system_fingerprint: str | None = None


class Assembler:
    """Feed a stream's chunk payloads; `body()` is the same answer as a `chat.completion`,
    or None when the stream was not a complete, well-formed answer (nothing to cache)."""

    def __init__(self) -> None:
        self._head: _Chunk | None = None
        self._text: dict[int, list[str]] = {}
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self._finish: dict[int, str] = {}
        self._usage: dict[str, Any] | None = None
        self.broken = False

    def feed(self, payload: bytes) -> None:
        if self.broken:
            return
        try:
            chunk = msgspec.json.decode(payload, type=_Chunk)
        except msgspec.DecodeError:
            self.broken = True
            return
        self._head = self._head or chunk
        if chunk.usage is not None:
            self._usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                self._text.setdefault(ch.index, []).append(ch.delta.content)
            for call in ch.delta.tool_calls or ():
                self._add_call(self._calls.setdefault(ch.index, {}), call)
            if ch.finish_reason is not None:
                self._finish[ch.index] = ch.finish_reason
            self._text.setdefault(ch.index, [])

    @staticmethod
    def _add_call(calls: dict[int, dict[str, Any]], d: _DeltaCall) -> None:
        call = calls.setdefault(
            d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if d.id:
            call["id"] = d.id
        if d.type:
            call["type"] = d.type
        for part in ("name", "arguments"):
            call["function"][part] += (d.function or {}).get(part) or ""

    def body(self) -> bytes | None:
        head = self._head
        if self.broken or head is None or not self._text or set(self._finish) != set(self._text):
            return None
        choices = []
        for index in sorted(self._text):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self._text[index])}
            calls = self._calls.get(index)
            if calls:
                message["tool_calls"] = [calls[i] for i in sorted(calls)]
                message["content"] = message["content"] or None
            message["refusal"] = None
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": self._finish[index]})  # fmt: skip
        out: dict[str, Any] = {
            "id": head.id, "object": "chat.completion", "created": head.created,
            "model": head.model, "choices": choices, "usage": self._usage,
        }  # fmt: skip
        return _plain(out)


def assemble(payloads: Iterable[bytes]) -> bytes | None:
    assembler = Assembler()
    for payload in payloads:
        assembler.feed(payload)
    return assembler.body()
