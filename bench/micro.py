"""Micro-costs of hot-path pieces, each against the cheaper alternative a suggestion names.

Each case runs in one uvloop loop, many times, and reports microseconds per call (the
best of three rounds); the difference between a pair is what the suggestion would save
per request or per chunk.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import uvloop
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from proxy import pipeline
from proxy.observe import Observer, RequestRecord
from proxy.providers.sse import iter_sse
from proxy.wire import ChatRequest

from .load import chat_body
from .tuned import unless_disconnected
from .upstream import SSE_RESPONSE

_SSE = SSE_RESPONSE.split(b"\r\n\r\n", 1)[1]  # 10 events and [DONE]


async def iter_sse_lines(content: StreamReader) -> AsyncIterator[bytes]:
    """The SSE parser before proxy/providers/sse.py: one `readline()` await per line."""
    data: list[bytes] = []
    async for line in content:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)


async def _time(fn: Callable[[], Awaitable[object]], n: int, rounds: int = 3) -> float:
    """µs per call: the best of `rounds` rounds of `n` calls (least disturbed by neighbours)."""
    for _ in range(min(n, 200)):
        await fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, time.perf_counter() - started)
    return best / n * 1e6


def _reader(data: bytes, pieces: int) -> StreamReader:
    reader = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16)
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        reader.feed_data(data[i : i + step])
    reader.feed_eof()
    return reader


class _Sink(asyncio.Protocol):
    def __init__(self, want: int, done: asyncio.Future[None]) -> None:
        self.left, self.done = want, done

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


async def _loopback(events: list[bytes], rounds: int, joined: bool) -> float:
    """µs per event to write `events` over loopback TCP, one write each or one for all."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    want = sum(map(len, events)) * rounds
    server = await loop.create_server(lambda: _Sink(want, done), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    started = time.perf_counter()
    for i in range(rounds):
        if joined:
            transport.write(b"".join(events))
        else:
            for event in events:
                transport.write(event)
        if i % 8 == 7:
            await asyncio.sleep(0)  # let the reader keep up, as a live client would
    await done
    elapsed = time.perf_counter() - started
    transport.close()
    server.close()
    return elapsed / (rounds * len(events)) * 1e6


async def _cases(n: int) -> list[tuple[str, float, float, str]]:
    loop = asyncio.get_running_loop()
    out = []

    async def with_timeout() -> None:
        async with asyncio.timeout_at(loop.time() + 60):
            await asyncio.sleep(0)

    now, alt = await _time(with_timeout, n), await _time(lambda: asyncio.sleep(0), n)
    how = "shipped: a bare await (one deadline timer per stream, `streaming._Deadline`)"
    what = "per chunk: `async with asyncio.timeout_at()` around the read (before)"
    out.append((what, now, alt, how))

    async def drain(parse: Callable[[StreamReader], AsyncIterator[bytes]], pieces: int) -> None:
        async for _ in parse(_reader(_SSE, pieces)):
            pass

    for pieces, label in ((1, "one read"), (10, "10 reads")):
        line = await _time(lambda p=pieces: drain(iter_sse_lines, p), n // 10)
        block = await _time(lambda p=pieces: drain(iter_sse, p), n // 10)
        what = f"per chunk: SSE parse, 10 events in {label}, `readline()` per line (before)"
        how = "shipped `iter_sse`: blocks from `iter_any()`, split on blank lines"
        out.append((what, line / 10, block / 10, how))

    events = [b"%x\r\ndata: %s\n\n\r\n" % (len(e) + 8, e) for e in _SSE.split(b"\n\n")[:10]]
    one = min([await _loopback(events, n // 10, False) for _ in range(3)])
    joined = min([await _loopback(events, n // 10, True) for _ in range(3)])
    what = "per chunk: one socket write per SSE event (10 events, loopback TCP)"
    out.append((what, one, joined, "one write per upstream read (here: 10 events)"))

    never = loop.create_future()

    async def receive() -> dict[str, str]:
        await asyncio.shield(never)
        return {"type": "http.disconnect"}

    async def work() -> int:
        await asyncio.sleep(0)
        return 1

    watched = await _time(lambda: pipeline.unless_disconnected(work(), receive, {}), n)
    lazy = await _time(lambda: unless_disconnected(work(), receive), n)
    how = "a watcher armed only after 50 ms (bench/tuned.py)"
    out.append(("per request: disconnect watcher task", watched, lazy, how))

    with tempfile.TemporaryDirectory() as tmp:
        audited = Observer({"bench"}, audit=str(Path(tmp) / "audit.jsonl"))
        quiet = Observer({"bench"}, audit="off")

        def record() -> RequestRecord:
            rec = RequestRecord("0123456789abcdef", "bench", False, provider="static")
            rec.model, rec.latency_ms, rec.duration_ms = "bench", 0.4, 0.5
            rec.prompt_tokens, rec.completion_tokens = 12, 10
            return rec

        async def finish(observer: Observer) -> None:
            observer.finished(record())

        on = await _time(lambda: finish(audited), n)
        off = await _time(lambda: finish(quiet), n)
        audited.audit.close()
    what = "per request: `Observer.finished` (metrics + audit line)"
    out.append((what, on, off, "audit_log: off (metrics only)"))

    body = chat_body("bench", False)

    async def parse() -> bytes:
        return ChatRequest(body).body_for("bench")

    async def nothing() -> None:
        return None

    what = f"per request: `ChatRequest` + `body_for` ({len(body)}-byte body)"
    out.append((what, await _time(parse, n), await _time(nothing, n), "(none: the whole cost)"))
    return out


def run(n: int = 10000) -> list[tuple[str, float, float, str]]:
    return uvloop.run(_cases(n))


def markdown(rows: list[tuple[str, float, float, str]]) -> str:
    lines = ["| piece | µs now | µs alternative | alternative |", "|---|--:|--:|---|"]
    for label, now, alt, how in rows:
        lines.append(f"| {label} | {now:.2f} | {alt:.2f} | {how} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(run()))
