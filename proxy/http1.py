"""One HTTP/1.1 connection to an upstream: a request out, its answer in, as it comes.

    Connection (asyncio Protocol + httptools' C parser) ─► Response: status, headers, body
    a Response is read once (`read`, `iter_any`); read to its end, its connection goes
    back to the pool (`Client` in `upstream`), else the socket is closed

Bounded: the header block (`MAX_HEAD_BYTES`), the bytes buffered before the reader takes
them (reading pauses past `HIGH_WATER`), inflation (a compressed body comes out in steps
of at most `STEP` bytes: a reader with a cap stops a bomb at the cap).

Errors (`policy` maps them to reasons):

    ConnectTimeout(TimeoutError)      no connection within `connect` seconds
    ReadTimeout(TimeoutError)         no bytes for `read` seconds
    ConnectError(ConnectionError)     refused, reset, DNS, TLS: while connecting
    Disconnected(ConnectionError)     closed before the answer's headers
    ProtocolError(Exception)          not HTTP, a head over the limit, bad chunks or gzip
      └─ PayloadError                 closed in the middle of the body
"""

from __future__ import annotations

import asyncio
import collections
import zlib
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httptools

if TYPE_CHECKING:
    from .upstream import Client

MAX_HEAD_BYTES = 64 * 1024
HIGH_WATER = 256 * 1024
STEP = 64 * 1024


class ConnectTimeout(TimeoutError):
    pass


class ReadTimeout(TimeoutError):
    pass


class ConnectError(ConnectionError):
    pass


class Disconnected(ConnectionError):
    pass


class ProtocolError(Exception):
    pass


class PayloadError(ProtocolError):
    pass


class Headers(dict[str, str]):
    """Response headers by lower-case name (repeated ones joined with ", ")."""

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class Connection(asyncio.Protocol):
    """One socket: sends a request, parses its answer, goes back to the pool after it."""

    __slots__ = (
        "client", "origin", "loop", "parser", "transport", "closed", "idle_since",
        "answer_bytes", "response", "_head_waiter", "_header_list", "_head_size", "_in_head",
        "_read",
    )  # fmt: skip

    def __init__(self, client: Client, origin: tuple[str, str, int]) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.answer_bytes = 0  # of the current answer: 0 = the upstream said nothing yet
        self.response: Response | None = None
        self._head_waiter: asyncio.Future[Response] | None = None
        self._header_list: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._in_head = False
        self._read: float | None = None

    # the request

    async def send(self, head: bytes, body: bytes, read: float | None) -> Response:
        transport = self.transport
        assert transport is not None
        self.answer_bytes = 0
        self.response = None
        self._read = read
        self._in_head = True
        self._head_waiter = self.loop.create_future()
        if len(body) < 16384:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        try:
            if read is None:
                return await self._head_waiter
            timer = self.loop.call_later(read, self._timed_out)
            try:
                return await self._head_waiter
            finally:
                timer.cancel()
        except BaseException:
            self.abort()
            raise

    def _timed_out(self) -> None:
        self._fail(ReadTimeout(f"no answer within {self._read} s"))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answer_bytes += len(data)
        if self._head_waiter is None and self.response is None:
            self.abort()  # bytes nobody asked for, on an idle connection
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP from upstream: {exc}"))
        if self._in_head and self.answer_bytes > MAX_HEAD_BYTES:  # reads are <= 256 KiB
            self._fail(ProtocolError(f"upstream headers exceed {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost says what it means

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client._forget(self)
        response = self.response
        if self._head_waiter is not None:
            self._fail(Disconnected("the upstream closed the connection before answering"))
        elif response is not None and not response.done:
            if response.until_close:
                response.finish()  # a body without length ends when the connection does
            else:
                response.fail(PayloadError("the upstream closed the connection mid-answer"))
        self.response = self.parser = None  # type: ignore[assignment]  # no cycles left

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._header_list = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_list.append((name, value))
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return  # 1xx (103 Early Hints, 100 Continue): the answer follows
        if self._head_size > MAX_HEAD_BYTES:
            self._fail(ProtocolError(f"upstream headers exceed {MAX_HEAD_BYTES} bytes"))
            return
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is None or waiter.done():
            self.abort()  # an answer nobody is waiting for
            return
        headers = Headers()
        for raw_name, raw_value in self._header_list:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._in_head = False
        framed = "content-length" in headers or "transfer-encoding" in headers
        try:
            inflate = _inflater(headers.get("content-encoding"))
        except ProtocolError as exc:
            waiter.set_exception(exc)
            self.abort()
            return
        self.response = Response(self, status, headers, not framed, inflate)
        waiter.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response.feed(body)

    def on_message_complete(self) -> None:
        if self.response is None:
            return  # the end of a 1xx
        if not self.parser.should_keep_alive():
            self.response.reusable = False
        self.response.finish()

    # ends

    def _fail(self, exc: Exception) -> None:
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self.response is not None and not self.response.done:
            self.response.fail(exc if isinstance(exc, ProtocolError) else PayloadError(str(exc)))
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """An answer: `status`, `headers`, and its body as it arrives (`read`, `iter_any`)."""

    __slots__ = (
        "status", "headers", "until_close", "done", "reusable", "content_length", "_conn",
        "_chunks", "_buffered", "_paused", "_error", "_waiter", "_inflate",
    )  # fmt: skip

    def __init__(
        self,
        conn: Connection,
        status: int,
        headers: Headers,
        until_close: bool,
        inflate: zlib._Decompress | None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.until_close = until_close
        self.done = False
        self.reusable = True
        self._conn: Connection | None = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._error: tuple[type[Exception], str] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._inflate = inflate
        length = headers.get("content-length")
        self.content_length = int(length) if length and length.isdigit() else None

    # fed by the connection

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        conn = self._conn
        if self._buffered > HIGH_WATER and not self._paused and conn and not conn.closed:
            self._paused = True
            conn.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def finish(self) -> None:
        self.done = True
        conn = self._conn
        if conn is not None:
            conn.response = None
        self._wake()

    def fail(self, exc: Exception) -> None:
        # Kept as class and text, raised anew: a raised exception holds the reader's frame,
        # which holds this response (a reference cycle per failed request).
        self._error = (type(exc), str(exc))
        self.done = True
        self.reusable = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # read by the caller

    async def read(self) -> bytes:
        """The whole body (decompressed). Unbounded: callers cap it (`read_capped`)."""
        parts = [part async for part in self.iter_any()]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_any(self) -> Response:
        return self  # pieces are at most HIGH_WATER raw or STEP inflated bytes

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._inflate is not None and self._inflate.unconsumed_tail:
                data = self._inflate.decompress(self._inflate.unconsumed_tail, STEP)
                if data:
                    return data
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._paused and self._buffered <= HIGH_WATER // 4:
                    self._paused = False
                    if self._conn is not None and not self._conn.closed:
                        self._conn.transport.resume_reading()  # type: ignore[union-attr]
                if self._inflate is None:
                    return data
                data = self._inflate_step(data)
                if data:
                    return data
                continue
            if self._error is not None:
                raise self._error[0](self._error[1])
            if self.done:
                self.release()
                raise StopAsyncIteration
            await self._wait()

    def _inflate_step(self, data: bytes) -> bytes:
        try:
            return self._inflate.decompress(data, STEP)  # type: ignore[union-attr]
        except zlib.error as exc:
            self.close()
            raise ProtocolError(f"upstream body does not decompress: {exc}") from None

    async def _wait(self) -> None:
        conn = self._conn
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        read = conn._read if conn is not None else None
        if read is None:
            await waiter
            return
        timer = conn.loop.call_later(read, _expire_read, self, read)  # type: ignore[union-attr]
        try:
            await waiter
        finally:
            timer.cancel()

    # the end

    def release(self) -> None:
        """Back to the pool if the answer was read to its end, else the socket closes."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.done and self.reusable and not self.until_close:  # fail() clears reusable
            conn.client._release(conn)
        else:
            conn.abort()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _expire_read(response: Response, seconds: float) -> None:
    response.fail(ReadTimeout(f"no bytes from the upstream for {seconds} s"))
    response.close()


def _inflater(encoding: str | None) -> zlib._Decompress | None:
    if not encoding or encoding == "identity":
        return None
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(47)  # zlib or gzip header, detected
    raise ProtocolError(f"upstream used an unsupported Content-Encoding: {encoding!r}")
