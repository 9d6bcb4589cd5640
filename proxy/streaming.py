"""A committed stream owns its resources: `OwnedStream`.

Until its first chunk is in, a stream can still fail over to the next chain entry
(`open_stream`, under the first-token timeout; TensorZero's peek_first_chunk). From then
on one `OwnedStream` holds the first chunk, the upstream iterator, the provider's
concurrency slot and the request's bookkeeping. Iterating it relays the chunks (a chunk
carrying `usage` is read for accounting) within the request deadline, with one timer for
the whole stream (`_Deadline`), not a timeout per chunk. `aclose()` releases all of it,
whether or not iteration ever started, exactly once; closing twice is harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from . import timer
from .config import Entry
from .errors import Attempt, UpstreamError
from .policy import map_exception
from .reasons import Reason
from .wire import Usage, UsageView

_usage_view = msgspec.json.Decoder(UsageView)


class Answer(msgspec.Struct):
    """Who answered, how fast, and after which failures; `body` xor `stream` is set."""

    provider: str
    model: str
    latency_ms: float
    attempts: list[Attempt]
    body: bytes = b""
    usage: Usage | None = None
    stream: OwnedStream | None = None
    entry: Entry | None = None
    cost_usd: float | None = None
    cached: bool = False


class OwnedStream:
    """A committed stream: iterate for the payloads; `aclose()` releases everything once.

    `on_close(stream)` runs exactly once, after the upstream is closed and the slot freed,
    with `outcome` set: ok (the upstream finished), stream_error (it failed mid-way;
    `error` says why) or cancelled (closed before its end).
    """

    def __init__(
        self,
        first: bytes,
        chunks: AsyncIterator[bytes],
        release: Callable[[], None],
        deadline: float,
        on_close: Callable[[OwnedStream], None],
    ) -> None:
        self._first: bytes | None = first
        self._chunks = chunks
        self._release: Callable[[], None] | None = release
        self._on_close = on_close
        self._timer = _Deadline(deadline)
        self.usage: Usage | None = None
        self.outcome = "cancelled"
        self.error: UpstreamError | None = None
        self.closed = False
        self.cost_usd: float | None = None  # set by the bookkeeping once closed

    def __aiter__(self) -> OwnedStream:
        return self

    async def __anext__(self) -> bytes:
        if self.closed:
            raise StopAsyncIteration
        chunk = self._first
        if chunk is not None:
            self._first = None
        else:  # the next from upstream, here rather than in a helper: one frame less a chunk
            deadline = self._timer
            if deadline.loop.time() >= deadline.deadline:
                error = UpstreamError(Reason.DEADLINE, "request deadline reached mid-stream")
                await self._fail(error)
            deadline.task = task = asyncio.current_task()
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self.outcome = "ok"
                await self.aclose()
                raise
            except asyncio.CancelledError:
                if deadline.fired and task is not None and task.uncancel() == 0:
                    error = UpstreamError(Reason.DEADLINE, "request deadline reached mid-stream")
                    await self._fail(error)
                raise
            except Exception as exc:
                await self._fail(map_exception(exc), exc)
                raise  # unreachable: _fail raises
            finally:
                deadline.task = None
        if b'"usage"' in chunk:
            self._take_usage(chunk)
        return chunk

    async def _fail(self, error: UpstreamError, cause: BaseException | None = None) -> None:
        self.outcome, self.error = "stream_error", error
        await self.aclose()
        raise error from cause

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._first = None
        self._timer.stop()
        release, self._release = self._release, None
        try:
            if release is not None:
                release()
            await close_stream(self._chunks)
        finally:
            # Dropped once called: the callback holds the chain walk, which holds this
            # stream (a cycle the collector would have to find, every stream).
            on_close, self._on_close = self._on_close, _closed_already
            on_close(self)

    def _take_usage(self, chunk: bytes) -> None:
        try:
            usage = _usage_view.decode(chunk).usage
        except msgspec.DecodeError:
            return
        if usage is not None:
            self.usage = usage


class _Deadline:
    """At `deadline`, cancel the stream's task if it is waiting for the upstream (`task` is
    set only then); otherwise the relay sees the time before its next wait."""

    __slots__ = ("loop", "deadline", "handle", "task", "fired")

    def __init__(self, deadline: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.deadline = deadline
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(deadline, self._fire)
        self.task: asyncio.Task[Any] | None = None
        self.fired = False

    def stop(self) -> None:
        handle, self.handle = self.handle, None  # the handle holds this object: no cycle left
        if handle is not None:
            handle.cancel()

    def _fire(self) -> None:
        if self.task is not None:
            self.fired = True
            self.task.cancel()


def _closed_already(stream: OwnedStream) -> None:
    return None


async def first_chunk(chunks: AsyncIterator[bytes], within: float) -> bytes:
    """The stream's first chunk within `within` seconds; on any failure the upstream is closed."""
    try:
        with timer.within(within):
            return await anext(chunks)
    except StopAsyncIteration:
        await close_stream(chunks)
        raise UpstreamError(Reason.BAD_RESPONSE, "stream ended before its first chunk") from None
    except BaseException:
        await close_stream(chunks)
        raise


async def close_stream(chunks: AsyncIterator[bytes] | OwnedStream) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
