"""Bounds at the HTTP layer (proxy/httpproto.py), over real sockets to a real uvicorn."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from proxy.config import ServerSpec
from proxy.httpproto import Limits, bounded_protocol, uvicorn_options

from .servers import open_fds, settle
from .test_hardening_support import OptionsServer


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":
        await asyncio.sleep(3.0)
    answer = b"%d headers, %d bytes" % (len(scope["headers"]), len(body))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": answer})


class BoundedServer(OptionsServer):
    def __init__(self, **server: Any) -> None:
        spec = msgspec.convert(server, ServerSpec)
        options = uvicorn_options(spec)  # a bare app: the limits go in the class
        options["http"] = bounded_protocol(Limits.from_server(spec))
        super().__init__(_app, log_level="error", lifespan="off", **options)


@pytest.fixture(scope="module")
def srv() -> Iterator[BoundedServer]:
    server = BoundedServer(
        max_header_bytes=16384, max_headers=50, header_timeout=0.5, body_timeout=0.5,
        keep_alive_timeout=0.5, max_connections=40,
    )  # fmt: skip
    yield server
    server.close()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def _get(srv: BoundedServer, head: bytes, body: bytes = b"") -> bytes:
    with srv.connect() as sock:
        sock.sendall(head + body)
        return _read_all(sock)


def _request(*headers: bytes, path: bytes = b"/") -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"host: x", b"connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_ordinary_requests_pass(srv: BoundedServer) -> None:
    answer = _get(srv, _request(*(b"x-h%d: v" % i for i in range(40))))
    assert answer.startswith(b"HTTP/1.1 200") and b"42 headers" in answer
    big = _request(b"x-big: " + b"a" * 12000)
    assert _get(srv, big).startswith(b"HTTP/1.1 200")


def test_too_many_headers_get_431(srv: BoundedServer) -> None:
    answer = _get(srv, _request(*(b"x-h%d: v" % i for i in range(60))))
    assert answer.startswith(b"HTTP/1.1 431")
    assert b"request_header_fields_too_large" in answer


def test_huge_header_gets_431_without_reading_it_all(srv: BoundedServer) -> None:
    with srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent = 0
        try:
            while sent < 50_000_000:  # the server hangs up long before this
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
    assert sent < 5_000_000
    assert answer.startswith(b"HTTP/1.1 431") or answer == b""


def test_large_body_is_not_a_large_head(srv: BoundedServer) -> None:
    body = b"x" * 1_000_000
    head = b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(
        body
    )
    answer = _get(srv, head, body)
    assert answer.startswith(b"HTTP/1.1 200") and b"1000000 bytes" in answer


def test_keep_alive_requests_each_get_a_fresh_head_budget(srv: BoundedServer) -> None:
    one = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10000 + b"\r\n\r\n"
    with srv.connect() as sock:
        for _ in range(5):
            sock.sendall(one)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "partial",
    [b"", b"GET / HTTP/1.1\r\nhost: x\r\n", b"POST / HTTP/1.1\r\ncontent-length: 100\r\n\r\nab"],
    ids=["silent", "partial-head", "partial-body"],
)
def test_connections_that_never_finish_a_request_are_closed(
    srv: BoundedServer, partial: bytes
) -> None:
    started = time.monotonic()
    with srv.connect() as sock:
        sock.sendall(partial)
        answer = _read_all(sock)  # returns when the server closes
    assert time.monotonic() - started < 5
    if partial.startswith(b"GET"):
        assert answer.startswith(b"HTTP/1.1 408")


def test_slowloris_drip_is_closed(srv: BoundedServer) -> None:
    started = time.monotonic()
    with srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        try:
            for i in range(100):
                sock.sendall(b"x-%d: v\r\n" % i)
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        _read_all(sock)
    assert time.monotonic() - started < 5


def test_idle_keep_alive_is_closed(srv: BoundedServer) -> None:
    with srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert _read_all(sock) == b""
        assert time.monotonic() - started < 5


def test_connection_cap_answers_503_and_frees_everything(srv: BoundedServer) -> None:
    fds = open_fds()
    held = [srv.connect() for _ in range(39)]  # uvicorn serves up to the cap minus one
    try:
        for sock in held:
            sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        settle(lambda: 39 - srv.connections(), 0)
        answer = _get(srv, _request())
        assert answer.startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    assert settle(srv.connections, 0, within=5) == 0
    assert settle(open_fds, fds, slack=2, within=5) <= fds + 2
    assert _get(srv, _request()).startswith(b"HTTP/1.1 200")
