"""Server-sent events from an upstream, as the `data` of each event, read block by block.

One await per network read (`iter_any`), not one per line: an OpenAI chunk is two lines
(`data: {...}` and a blank one), and a read usually holds several chunks. Follows the
WHATWG event-stream rules that matter to a relay:

- lines end in CRLF, LF or a lone CR (a CR at the end of a read may be half of a CRLF,
  so it waits for the next read);
- an event ends at a blank line; its `data:` lines (one optional space after the colon)
  are joined with LF; comments (`: keep-alive`) and other fields (`event:`, `id:`,
  `retry:`) are skipped, and an event with no data yields nothing;
- data still pending when the stream ends is yielded (a lenient `data: [DONE]` without
  its blank line), so the caller decides whether the end was clean.

An event may not grow past `MAX_EVENT` bytes without ending: an upstream that never sends
a blank line cannot make the gateway buffer without bound.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ..errors import UpstreamError
from ..upstream import Response

MAX_EVENT = 16 * 1024 * 1024


async def iter_sse(content: Response) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event in `content`, in order."""
    buf = b""
    async for block in content.iter_any():
        buf = buf + block if buf else block
        held = b""
        if b"\r" in buf:
            if buf[-1:] == b"\r":
                buf, held = buf[:-1], b"\r"
            buf = _lf(buf)
        if b"\n\n" not in buf:
            if len(buf) > MAX_EVENT:
                raise UpstreamError("bad_response", "upstream event exceeds the size limit")
            buf += held
            continue
        *events, buf = buf.split(b"\n\n")
        buf += held
        for event in events:
            if event[:6] == b"data: " and b"\n" not in event:
                yield event[6:]  # the usual one-line event
            else:
                data = _data(event)
                if data is not None:
                    yield data
    if buf:
        data = _data(_lf(buf))
        if data is not None:
            yield data


def _lf(text: bytes) -> bytes:
    """CRLF and lone CR line ends as LF."""
    return text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _data(event: bytes) -> bytes | None:
    """The joined `data` lines of one event, None if it has none."""
    lines = [
        line[6:] if line[5:6] == b" " else line[5:]
        for line in event.split(b"\n")
        if line[:5] == b"data:"
    ]
    return b"\n".join(lines) if lines else None
