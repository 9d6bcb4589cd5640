"""What the HTTP adapters share: their client pool, timeouts, capped reads, probes."""

from __future__ import annotations

from typing import Any

import msgspec

from ..config import Entry
from ..errors import UpstreamError
from ..reasons import Reason
from ..upstream import Client, Response


def read_timeout(entry: Entry, stream: bool) -> float | None:
    """The longest wait for the upstream's next bytes in one attempt; the chain enforces
    the rest. A non-stream answer is bounded by the chain alone (`timeout`). A stream's
    headers and first chunk are bounded by the chain's `first_token_timeout`, which may be
    longer than `timeout` (a cold model loading): the socket read timeout must not cut it
    short, so it is the longer of the two; once chunks flow it bounds the gap between them.
    """
    return max(entry.timeout, entry.first_token_timeout) if stream else None


async def read_capped(resp: Response, limit: int) -> bytes:
    """The body, decompressed, but never more than `limit` bytes of it in memory."""
    length = resp.content_length
    if length is not None and length <= limit and "Content-Encoding" not in resp.headers:
        return await resp.read()  # not compressed: its length bounds it (the common case)
    parts: list[bytes] = []
    size = 0
    async for block in resp.iter_any():  # at most 256 KiB raw or 64 KiB inflated each
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


async def fetch(url: str, headers: dict[str, str], connect_s: float) -> tuple[int, bytes]:
    """GET a listing endpoint, for probes: a pool of its own, closed after; no redirects."""
    probe = Client(headers)
    try:
        resp = await probe.get(url, connect_s, read=connect_s + 5)
        async with resp:
            return resp.status, await read_capped(resp, 8 * 1024 * 1024)
    finally:
        await probe.close()


async def get_json(url: str, headers: dict[str, str], connect_s: float) -> Listing:
    """A listing endpoint's ids or names; an HTTP error status raises."""
    status, body = await fetch(url, headers, connect_s)
    if status != 200:
        raise UpstreamError(Reason.BAD_RESPONSE, f"HTTP {status} from {url}", status=status)
    return _listing.decode(body)
