"""What the HTTP adapters share: their client session, capped reads, JSON probes."""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
import msgspec

from ..config import Entry
from ..errors import UpstreamError
from ..reasons import Reason

_READ = 64 * 1024


def session() -> aiohttp.ClientSession:
    """A provider's own pool: no cookies kept, no User-Agent of aiohttp's."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def timeouts(entry: Entry, stream: bool) -> aiohttp.ClientTimeout:
    """The socket timeouts of one attempt; the chain enforces the rest.

    A non-stream answer is bounded by the chain (`timeout`). A stream's headers and first
    chunk are bounded by the chain's `first_token_timeout`, which may be longer than
    `timeout` (a cold model loading): the socket read timeout must not cut it short, so
    it is the longer of the two; once chunks flow it bounds the gap between them.
    """
    read = max(entry.timeout, entry.first_token_timeout) if stream else None
    return _timeout(entry.connect_timeout, read)


@functools.lru_cache(maxsize=256)  # a few per config entry; built once, not per request
def _timeout(connect: float, read: float | None) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, decompressed, but never more than `limit` bytes of it in memory."""
    length = resp.content_length
    if length is not None and length <= limit and "Content-Encoding" not in resp.headers:
        return await resp.read()  # not compressed: its length bounds it (the common case)
    parts: list[bytes] = []
    size = 0
    async for block in resp.content.iter_chunked(_READ):
        size += len(block)
        if size > limit:
            resp.close()
            raise UpstreamError(
                Reason.BAD_RESPONSE, f"upstream body is larger than the limit of {limit} bytes"
            )
        parts.append(block)
    return b"".join(parts)


class Listing(msgspec.Struct):
    """GET /models (OpenAI: `data`) or /api/tags (Ollama: `models`): the ids or names."""

    data: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []


_listing = msgspec.json.Decoder(Listing)


async def get_json(url: str, headers: dict[str, str], connect_s: float) -> Listing:
    """A listing endpoint, for probes: its own short-lived session, no redirects."""
    client_timeout = aiohttp.ClientTimeout(total=connect_s + 5, sock_connect=connect_s)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as client,
        client.get(url, headers=headers, allow_redirects=False) as resp,
    ):
        if resp.status != 200:
            raise UpstreamError(
                Reason.BAD_RESPONSE, f"HTTP {resp.status} from {url}", status=resp.status
            )
        return _listing.decode(await read_capped(resp, 8 * 1024 * 1024))
