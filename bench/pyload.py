"""A fallback HTTP/1.1 load generator for when wrk cannot be had: raw asyncio on uvloop.

    python -m bench.pyload --url URL --body-file F --conns C --seconds S --out RESULT.json

Each connection sends the same POST again and again (keep-alive) until S seconds are up;
RESULT.json gets the errors, the seconds and every latency in microseconds. `load.py`
runs several of these processes and merges them, so one Python process is not the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import uvloop


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"content-length:")
    if at >= 0:
        await reader.readexactly(int(lower[at + 15 : lower.find(b"\r\n", at)]))
        return status
    while True:  # chunked
        size = int((await reader.readline()).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return status


async def _connection(host: str, port: int, request: bytes, until: float, out: dict) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < until:
            started = time.perf_counter_ns()
            writer.write(request)
            status = await _read_response(reader)
            out["latencies"].append((time.perf_counter_ns() - started) // 1000)
            if status >= 400:
                out["errors"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        out["errors"] += 1
    finally:
        writer.close()


async def main(url: str, body: bytes, conns: int, seconds: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
    ) % (parts.path.encode(), host.encode(), port, len(body), body)
    out: dict = {"latencies": [], "errors": 0}
    until = time.monotonic() + seconds
    started = time.monotonic()
    async with asyncio.timeout(seconds + 15):
        await asyncio.gather(*(_connection(host, port, request, until, out) for _ in range(conns)))
    out["seconds"] = time.monotonic() - started
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.body_file, "rb") as f:
        body = f.read()
    result = uvloop.run(main(args.url, body, args.conns, args.seconds))
    with open(args.out, "w") as f:
        json.dump(result, f)
