"""The upstream HTTP/1.1 client (`proxy.upstream`) against raw sockets that answer exactly
the bytes each test scripts: keep-alive, framing, bounds, timeouts, stale connections."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable

import pytest

from proxy import upstream
from proxy.errors import UpstreamError
from proxy.providers.http import read_capped

Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """Reads each request (head + Content-Length body) and lets `reply` answer it."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.reply(request, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test ended
        finally:
            self.closed.set()
            writer.close()


def answer(data: bytes, close: bool = False) -> Reply:
    async def reply(_request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return reply


async def test_keep_alive_reuses_one_connection_and_sends_only_its_headers() -> None:
    client = upstream.Client({"Authorization": "Bearer k", "Content-Type": "application/json"})
    async with RawServer(answer(OK)) as server:
        for _ in range(3):
            resp = await client.post(server.url, b'{"a":1}', b"X-Request-Id: r1\r\n")
            assert (resp.status, await resp.read()) == (200, b"{}")
            assert resp.headers["Content-Type"] == "application/json"
        await client.close()
    assert server.connections == 1
    head = server.requests[0].decode()
    assert head.startswith("POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1:")
    assert "Authorization: Bearer k\r\n" in head and "X-Request-Id: r1\r\n" in head
    assert head.endswith('Content-Length: 7\r\n\r\n{"a":1}')


async def test_chunked_and_until_close_bodies() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end"
    client = upstream.Client({})
    async with RawServer(answer(chunked)) as server:
        assert await (await client.post(server.url, b"")).read() == b"abcde"
    async with RawServer(answer(until_close, close=True)) as server:
        resp = await client.post(server.url, b"")
        assert await resp.read() == b"to the end"
    await client.close()


async def test_a_pooled_connection_the_upstream_closed_is_replaced_once() -> None:
    client = upstream.Client({})
    async with RawServer(answer(OK, close=True)) as server:  # closes after each answer
        for _ in range(3):
            assert (await client.post(server.url, b"")).status == 200
            await asyncio.sleep(0)
    assert server.connections == 3
    await client.close()


async def test_a_new_connection_closed_before_any_answer_is_an_error() -> None:
    async def hang_up(_request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.close()

    client = upstream.Client({})
    async with RawServer(hang_up) as server:
        with pytest.raises(upstream.Disconnected):
            await client.post(server.url, b"")
    assert server.connections == 1  # not retried: the request may have been seen
    await client.close()


async def test_refused_connection() -> None:
    client = upstream.Client({})
    async with RawServer(answer(OK)) as server:
        url = server.url
    with pytest.raises(upstream.ConnectError):
        await client.post(url, b"")
    await client.close()


async def test_a_redirect_is_an_answer_never_followed() -> None:
    moved = b"HTTP/1.1 307 Moved\r\nLocation: http://10.0.0.1/x\r\nContent-Length: 0\r\n\r\n"
    client = upstream.Client({})
    async with RawServer(answer(moved)) as server:
        resp = await client.post(server.url, b"secret prompt")
        assert (resp.status, resp.headers.get("location")) == (307, "http://10.0.0.1/x")
        assert await resp.read() == b""
    assert len(server.requests) == 1
    await client.close()


async def test_a_head_over_the_limit_is_refused_and_the_connection_closed() -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Junk: " + b"a" * (upstream.MAX_HEAD_BYTES + 10) + b"\r\n"
    client = upstream.Client({})
    async with RawServer(answer(big + b"Content-Length: 0\r\n\r\n")) as server:
        with pytest.raises(upstream.ProtocolError, match="exceed"):
            await client.post(server.url, b"")
        await asyncio.wait_for(server.closed.wait(), 5)
    await client.close()


async def test_garbage_is_a_protocol_error() -> None:
    client = upstream.Client({})
    async with RawServer(answer(b"SSH-2.0-OpenSSH\r\n\r\n")) as server:
        with pytest.raises(upstream.ProtocolError):
            await client.post(server.url, b"")
    await client.close()


async def test_early_hints_then_the_answer() -> None:
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    client = upstream.Client({})
    async with RawServer(answer(hints + OK)) as server:
        resp = await client.post(server.url, b"")
        assert (resp.status, await resp.read()) == (200, b"{}")
    await client.close()


async def test_gzip_is_inflated_and_a_bomb_stops_at_the_cap() -> None:
    body = b'{"ok": true}'
    plain = gzip.compress(body)
    zipped = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
    client = upstream.Client({})
    async with RawServer(answer(zipped % (len(plain), plain))) as server:
        assert await read_capped(await client.post(server.url, b""), 1000) == body
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = squeeze.compress(bytes(64 * 1024 * 1024)) + squeeze.flush()  # 64 MiB of zeros
    async with RawServer(answer(zipped % (len(bomb), bomb))) as server:
        tracemalloc.start()
        try:
            with pytest.raises(UpstreamError, match="larger than the limit"):
                await read_capped(await client.post(server.url, b""), 1024 * 1024)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 * 1024 * 1024
    await client.close()


async def test_an_unknown_content_encoding_is_a_protocol_error() -> None:
    odd = b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nxx"
    client = upstream.Client({})
    async with RawServer(answer(odd)) as server:
        with pytest.raises(upstream.ProtocolError, match="Content-Encoding"):
            await client.post(server.url, b"")
    await client.close()


async def test_reading_pauses_while_the_reader_is_slow() -> None:
    size = 8 * 1024 * 1024
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + bytes(size)
    client = upstream.Client({})
    async with RawServer(answer(big)) as server:
        resp = await client.post(server.url, b"")
        got, most = 0, 0
        async for block in resp.iter_any():
            got += len(block)
            most = max(most, resp._buffered)
            await asyncio.sleep(0.001)
        assert got == size
    assert most <= upstream.HIGH_WATER + 512 * 1024  # paused: one socket read past the mark
    await client.close()


async def test_silence_after_the_headers_is_a_read_timeout() -> None:
    silent = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    client = upstream.Client({})
    async with RawServer(answer(silent)) as server:
        resp = await client.post(server.url, b"", read=0.2)
        with pytest.raises(upstream.ReadTimeout):
            await resp.read()
        await asyncio.wait_for(server.closed.wait(), 5)  # the socket is gone
    await client.close()


async def test_a_reader_that_leaves_mid_answer_closes_the_connection() -> None:
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf"
    client = upstream.Client({})
    async with RawServer(answer(partial)) as server:
        async with await client.post(server.url, b"") as resp:
            assert await resp.iter_any().__anext__() == b"half"
        await asyncio.wait_for(server.closed.wait(), 5)
        assert (await client.post(server.url, b"")).status == 200  # a new connection
    assert server.connections == 2
    await client.close()


async def test_a_body_cut_short_is_a_payload_error() -> None:
    client = upstream.Client({})
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf"
    async with RawServer(answer(cut, close=True)) as server:
        resp = await client.post(server.url, b"")
        with pytest.raises(upstream.PayloadError):
            await resp.read()
    await client.close()


def test_header_values_with_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        upstream.Client({"X-Key": "a\r\nX-Evil: 1"})
    with pytest.raises(ValueError, match="not an http"):
        upstream.target("file:///etc/passwd")
    assert upstream.target("https://api.example.com/v1?x=1") == upstream.Target(
        ("https", "api.example.com", 443), b"api.example.com", b"/v1?x=1"
    )


async def test_close_ends_every_connection() -> None:
    slow = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"
    client = upstream.Client({})
    async with RawServer(answer(slow)) as server:
        resp = await client.post(server.url, b"")
        await client.close()
        with pytest.raises(upstream.PayloadError):
            await resp.read()
        await asyncio.wait_for(server.closed.wait(), 5)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (the openssl command line makes it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_upstream_and_keeps_the_connection(
    certificate: tuple[str, str],
) -> None:
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    hits: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                hits.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/models"
    trusting = upstream.Client({}, ssl_context=ssl.create_default_context(cafile=cert))
    for _ in range(2):
        resp = await trusting.post(url, b"")
        assert (resp.status, await resp.read()) == (200, b"{}")
    assert len(trusting._live) == 1  # one TLS connection, kept alive
    await trusting.close()
    stranger = upstream.Client({})  # the system's roots: this certificate is unknown
    with pytest.raises(upstream.ConnectError) as caught:
        await stranger.post(url, b"")
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    await stranger.close()
    server.close()
    assert len(hits) == 2
