"""A stream's answer: wait for its first chunk, then relay the rest within the deadline.

Until its first chunk is in, a stream can still fail over to the next chain entry
(`open_stream`, TensorZero's peek_first_chunk, under the first-token timeout). After it,
the answer is committed: `_relay` passes the chunks through untouched, reads a `usage`
chunk for accounting, and ends the stream at the request deadline with one timer for the
whole stream (`_Deadline`), not a timeout per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .config import Entry
from .errors import Attempt, UpstreamError
from .limits import Gate
from .providers import Call, Provider
from .wire import Usage, UsageView

_usage_view = msgspec.json.Decoder(UsageView)


@dataclass(slots=True)
class Answer:
    """Who answered, how fast, and after which failures; `body` xor `chunks` is set."""

    provider: str
    model: str
    latency_ms: float
    attempts: list[Attempt]
    body: bytes = b""
    usage: Usage | None = None
    chunks: AsyncIterator[bytes] | None = field(default=None, repr=False)
    entry: Entry | None = field(default=None, repr=False)
    cost_usd: float | None = None
    # Streams: called once the stream has ended, with its outcome (ok/stream_error/cancelled).
    on_end: Callable[[str], None] | None = field(default=None, repr=False)


async def open_stream(
    provider: Provider,
    call: Call,
    gate: Gate,
    first_token_timeout: float,
    deadline: float,
    answer: Answer,
) -> AsyncIterator[bytes]:
    """Start a stream and wait for its first chunk; a failure here can still fall back."""
    chunks = provider.stream(call)
    try:
        async with asyncio.timeout(first_token_timeout):
            await gate.acquire()
            try:
                first = await anext(chunks)
            except BaseException:
                gate.release()
                raise
    except StopAsyncIteration:
        await close_stream(chunks)
        raise UpstreamError("bad_response", "stream ended before its first chunk") from None
    except BaseException:
        await close_stream(chunks)
        raise
    return _relay(first, chunks, gate, deadline, answer)


async def _relay(
    first: bytes, chunks: AsyncIterator[bytes], gate: Gate, deadline: float, answer: Answer
) -> AsyncIterator[bytes]:
    """The committed stream: the first chunk, then the rest, within the request deadline.

    Chunks pass through untouched; one carrying `usage` is read for accounting. The gap
    between chunks is bounded by the adapter's own read timeout; the request deadline by
    one timer for the whole stream (`_Deadline`), not a timeout per chunk.
    """
    outcome = "stream_error"
    chunk = first
    timer = _Deadline(deadline)
    try:
        while True:
            if b'"usage"' in chunk:
                take_usage(chunk, answer)
            yield chunk
            timer.task = task = asyncio.current_task()
            try:
                if timer.loop.time() >= deadline:
                    raise UpstreamError("deadline", "request deadline reached mid-stream")
                chunk = await anext(chunks)
            except StopAsyncIteration:
                outcome = "ok"
                return
            except asyncio.CancelledError:
                if timer.fired and task is not None and task.uncancel() == 0:
                    raise UpstreamError("deadline", "request deadline reached mid-stream") from None
                raise
            finally:
                timer.task = None
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "cancelled"
        raise
    finally:
        timer.handle.cancel()
        gate.release()
        await close_stream(chunks)
        if answer.on_end is not None:
            answer.on_end(outcome)


class _Deadline:
    """At `deadline`, cancel the stream's task if it is waiting for the upstream (`task` is
    set only then); otherwise the relay sees the time before its next wait."""

    __slots__ = ("loop", "handle", "task", "fired")

    def __init__(self, deadline: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.handle = self.loop.call_at(deadline, self._fire)
        self.task: asyncio.Task[Any] | None = None
        self.fired = False

    def _fire(self) -> None:
        if self.task is not None:
            self.fired = True
            self.task.cancel()


def take_usage(chunk: bytes, answer: Answer) -> None:
    try:
        usage = _usage_view.decode(chunk).usage
    except msgspec.DecodeError:
        return
    if usage is not None:
        answer.usage = usage


async def close_stream(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
