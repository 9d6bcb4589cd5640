"""Prototype: the gateway with the hot-path suggestions patched in (in this process only).

    python -m bench.tuned --config models.yaml --port N [--patch]

Serves `proxy.app.create_app` exactly as `python -m proxy serve` does (uvicorn, uvloop,
httptools, the start-up heap frozen by the app's lifespan), and with `--patch` after
`apply()` swaps in, in `proxy`'s modules (never on disk):

- `relay` for `chain._relay`: the same loop, but the per-chunk `asyncio.timeout_at` is
  entered only when the request deadline is nearer than the entry's own read timeout
  (which aiohttp's `sock_read` already enforces on every read);
- `unless_disconnected`: the non-stream disconnect watcher task is armed only once a
  request has run 50 ms, so quick answers never create one.

The patched functions pass tests/test_gateway.py and tests/test_resilience.py (run them
with a pytest plugin calling `apply()`).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import uvicorn

from proxy import chain
from proxy.app import create_app
from proxy.chain import Answer, _close, _take_usage
from proxy.config import load
from proxy.errors import UpstreamError
from proxy.limits import Gate

try:  # where the chat route's disconnect watcher lives
    from proxy import fastpath as _route
except ImportError:  # before the chat route moved out of Litestar
    from proxy import app as _route  # type: ignore[no-redef]

WATCH_AFTER = 0.05


async def relay(
    first: bytes, chunks: AsyncIterator[bytes], gate: Gate, deadline: float, answer: Answer
) -> AsyncIterator[bytes]:
    outcome = "stream_error"
    chunk = first
    loop = asyncio.get_running_loop()
    read_timeout = answer.entry.timeout if answer.entry is not None else 0.0
    try:
        while True:
            if b'"usage"' in chunk:
                _take_usage(chunk, answer)
            yield chunk
            try:
                if deadline - loop.time() > read_timeout:
                    chunk = await anext(chunks)  # sock_read ends this read before the deadline
                    continue
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                outcome = "ok"
                return
            except TimeoutError:
                if loop.time() < deadline:
                    raise
                raise UpstreamError("deadline", "request deadline reached mid-stream") from None
    except (GeneratorExit, asyncio.CancelledError):
        outcome = "cancelled"
        raise
    finally:
        gate.release()
        await _close(chunks)
        if answer.on_end is not None:
            answer.on_end(outcome)


async def unless_disconnected(work: Awaitable[Any], receive: Any) -> Any:
    task = asyncio.current_task()
    assert task is not None
    gone = False
    watcher: asyncio.Future[None] | None = None

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    def arm() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    timer = asyncio.get_running_loop().call_later(WATCH_AFTER, arm)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise _route.ClientGone from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


def apply() -> list[str]:
    """Patch what exists under the expected names; returns what was patched."""
    patched = []
    for module, name, new in (
        (chain, "_relay", relay),
        (_route, "unless_disconnected", unless_disconnected),
        (_route, "_unless_disconnected", unless_disconnected),
    ):
        if hasattr(module, name):
            setattr(module, name, new)
            patched.append(f"{module.__name__}.{name}")
    return patched


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--patch", action="store_true", help="apply() the hot-path patches")
    args = parser.parse_args()
    if args.patch:
        print("bench.tuned patched:", ", ".join(apply()), flush=True)
    asgi = create_app(load(args.config))
    uvicorn.run(
        asgi, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
        log_level="warning", access_log=False, timeout_graceful_shutdown=10,
    )  # fmt: skip
