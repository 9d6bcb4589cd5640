"""The provider contract: every upstream is three methods behind one Protocol.

An adapter turns one chain entry's attempt into OpenAI wire bytes of the call's `op`:

- `complete(call)` returns a `Completion`: the whole answer body as bytes
  (`chat.completion`, `text_completion` or an embedding `list`), plus its usage when known.
- `stream(call)` is an async iterator of chunk payloads (bytes, without the `data: `
  framing). It ends normally only when the upstream finished the answer; anything else
  raises `UpstreamError` (or a transport error, mapped by `policy.map_exception`).
- `aclose()` releases connections, threads and models.

A provider that cannot serve an op raises `UpstreamError(Reason.UNSUPPORTED, ...)`; the
chain moves on at no cost. Adapters raise `UpstreamError` with a `Reason`; they never
decide about fallback and never enforce the attempt timeouts: the chain does both.

Besides the adapter class, a provider module has its config Struct (tagged on `type`),
`probe(config) -> Probe` for `omnimind-proxy check` and health checks, and may have
`preload(entries)` on its adapter; it is registered by one line in `providers/__init__.py`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import msgspec

from ..config import Entry
from ..wire import ApiRequest, Usage


class Op(enum.StrEnum):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


class Call(msgspec.Struct):
    """One attempt: the client's request, the chain entry it goes to, and what is asked."""

    request: ApiRequest
    entry: Entry
    request_id: str = ""
    op: Op = Op.CHAT


class Completion(msgspec.Struct):
    body: bytes
    usage: Usage | None = None


@dataclass(slots=True)
class Probe:
    """What a probe saw: reachable? which models (None: cannot tell)? and why not."""

    ok: bool
    detail: str
    models: set[str] | None = None


class Provider(Protocol):
    name: str

    async def complete(self, call: Call) -> Completion: ...

    def stream(self, call: Call) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...
