"""The provider contract: every upstream is three methods behind one Protocol.

An adapter turns one chain entry's attempt into OpenAI wire bytes:

- `complete(call)` returns a `Completion`: the body of a `chat.completion` as bytes,
  plus its usage when known.
- `stream(call)` is an async iterator of `chat.completion.chunk` JSON payloads (bytes,
  without the `data: ` framing). It ends normally only when the upstream finished the
  answer; anything else raises `UpstreamError` (or a transport error, mapped by
  `policy.map_exception`).
- `aclose()` releases connections, threads and models.

Adapters raise `UpstreamError` with a reason from `policy`; they never decide about
fallback and never enforce the attempt timeouts: the chain engine does both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..config import Entry
from ..wire import ChatRequest, Usage


@dataclass(slots=True)
class Call:
    """One attempt: the client's request and the chain entry it goes to."""

    request: ChatRequest
    entry: Entry
    request_id: str = ""


@dataclass(slots=True)
class Completion:
    body: bytes
    usage: Usage | None = None


class Provider(Protocol):
    name: str

    async def complete(self, call: Call) -> Completion: ...

    def stream(self, call: Call) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...
