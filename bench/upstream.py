"""A static OpenAI-compatible upstream: a raw asyncio Protocol on uvloop writing canned bytes.

    python -m bench.upstream --port N

`POST <any path>` answers a chat completion; the request's `model` and `stream` pick it:

    any model, stream false   one canned JSON completion (with usage)
    any model, stream true    10 SSE chunks (the last with usage) and [DONE], in one write
    drip-<n>-<ms>, stream     n chunks, the first at once, then one every <ms> (chunked
                              encoding); each chunk carries `"bench_rx"` and `"bench_t"`:
                              `time.monotonic_ns()` when the request was read and when the
                              chunk was written, so a client can time both ways

HTTP/1.1 keep-alive, Content-Length request bodies only (what wrk and aiohttp send).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import uvloop

_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_CHUNK = (
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"delta":{"content":"tok%d "},'
    b'"finish_reason":null}]}'
)
_LAST_CHUNK = (
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":10,"total_tokens":22}}'
)
_COMPLETION = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 "},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":10,'
    b'"total_tokens":22}}'
)


def _response(ctype: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
    return head % (ctype, len(body)) + body


def _sse_body() -> bytes:
    events = [b"data: " + _CHUNK % i + b"\n\n" for i in range(9)]
    events.append(b"data: " + _LAST_CHUNK + b"\n\n")
    return b"".join(events) + b"data: [DONE]\n\n"


JSON_RESPONSE = _response(b"application/json", _COMPLETION)
SSE_RESPONSE = _response(b"text/event-stream", _sse_body())
_DRIP_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _content_length(head: bytes) -> int:
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    stop = head.find(b"\r\n", at)
    return int(head[at + 15 : stop if stop >= 0 else None])


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.drip: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.drip is not None:
            self.drip.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.drip is None:
            self.serve()

    def serve(self) -> None:
        """Answer every complete request in the buffer (none while a drip is running)."""
        while self.transport is not None and self.drip is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            size = _content_length(head)
            total = end + 4 + size
            if len(self.buf) < total:
                return
            body = bytes(self.buf[end + 4 : total])
            del self.buf[:total]
            self.answer(body)

    def answer(self, body: bytes) -> None:
        assert self.transport is not None
        if _STREAM.search(body) is None:
            self.transport.write(JSON_RESPONSE)
            return
        match = _MODEL.search(body)
        model = match.group(1) if match else b""
        if not model.startswith(b"drip-"):
            self.transport.write(SSE_RESPONSE)
            return
        _, count, gap = model.split(b"-")[:3]
        received = time.monotonic_ns()
        self.drip = asyncio.ensure_future(self.dripping(int(count), int(gap) / 1000, received))

    async def dripping(self, count: int, gap: float, received: int) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(_DRIP_HEAD)
        try:
            for i in range(count):
                if i:
                    await asyncio.sleep(gap)
                chunk = _CHUNK % i
                stamp = b',"bench_rx":%d,"bench_t":%d}' % (received, time.monotonic_ns())
                stamped = chunk[:-1] + stamp
                transport.write(_http_chunk(b"data: " + stamped + b"\n\n"))
            transport.write(_http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        except asyncio.CancelledError:
            return
        self.drip = None
        self.serve()


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args().port))
