"""Stream clients: time each chunk of a dripping stream, and hold many slow streams open.

Chunk timing uses the stamps the upstream writes into each drip chunk (`time.monotonic_ns()`,
one clock for every process on the machine): a chunk's relay delay is when the client read
it minus when the upstream wrote it (`bench_t`); the request's is when the upstream read
the request (`bench_rx`) minus when the client sent it. Compared direct versus through the
gateway, the difference is what the gateway adds.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from .load import chat_body

_STAMP = re.compile(rb'"bench_rx":(\d+),"bench_t":(\d+)')


@dataclass
class DripTimes:
    ttft_ms: list[float] = field(default_factory=list)  # request sent -> first chunk read
    request_ms: list[float] = field(default_factory=list)  # request sent -> upstream read it
    first_ms: list[float] = field(default_factory=list)  # first chunk: written -> read
    later_ms: list[float] = field(default_factory=list)  # other chunks: written -> read


async def _one_drip(session: aiohttp.ClientSession, url: str, model: str, out: DripTimes) -> None:
    started = time.monotonic_ns()
    first = True
    async with session.post(url, data=chat_body(model, True)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            now = time.monotonic_ns()
            stamp = _STAMP.search(line)
            if stamp is None:
                continue
            delay = (now - int(stamp.group(2))) / 1e6
            if first:
                out.ttft_ms.append((now - started) / 1e6)
                out.request_ms.append((int(stamp.group(1)) - started) / 1e6)
                out.first_ms.append(delay)
                first = False
            else:
                out.later_ms.append(delay)


async def drip(targets: list[tuple[str, str]], streams: int, seconds: float) -> list[DripTimes]:
    """`streams` dripping streams per (url, model), one at a time, taking turns, within `seconds`.

    Taking turns spreads the machine's drift over every target alike.
    """
    out = [DripTimes() for _ in targets]
    until = time.monotonic() + seconds
    headers = {"Content-Type": "application/json"}
    sessions = [aiohttp.ClientSession(headers=headers) for _ in targets]
    try:
        for session, (url, model) in zip(sessions, targets, strict=True):
            await _one_drip(session, url, model, DripTimes())  # warm the connections
        for _ in range(streams):
            if time.monotonic() > until:
                break
            for session, (url, model), times in zip(sessions, targets, out, strict=True):
                await _one_drip(session, url, model, times)
    finally:
        for session in sessions:
            await session.close()
    return out


async def hold(
    url: str, model: str, count: int, sample: Callable[[], float], open_within: float = 60.0
) -> tuple[int, float]:
    """Open `count` streams of a slow drip, read each one's first chunk, then `sample()`.

    Returns (streams open at the sample, the sample); every stream is closed after.
    """
    release = asyncio.Event()
    settled = asyncio.Event()
    opened = failed = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal opened, failed
        try:
            async with session.post(url, data=chat_body(model, True)) as resp:
                if resp.status == 200 and (await resp.content.readline()).startswith(b"data:"):
                    opened += 1
                    if opened + failed == count:
                        settled.set()
                    await release.wait()
                    return
        except (aiohttp.ClientError, OSError):
            pass
        failed += 1
        if opened + failed == count:
            settled.set()

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        tasks = []
        for i in range(count):
            tasks.append(asyncio.ensure_future(one(session)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # connect in waves, not one burst
        try:
            await asyncio.wait_for(settled.wait(), open_within)
        except TimeoutError:
            pass
        await asyncio.sleep(1.0)  # let the server settle
        value = sample()
        seen = opened
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return seen, value
