"""Prototype: the gateway with the hot-path suggestions patched in (in this process only).

    python -m bench.tuned --config models.yaml --port N [--patch]

Serves `proxy.app.create_app` exactly as `python -m proxy serve` does (uvicorn, uvloop,
httptools, the start-up heap frozen by the app's lifespan), and with `--patch` after
`apply()` swaps in, in `proxy`'s modules (never on disk):

- `unless_disconnected`: the non-stream disconnect watcher task is armed only once a
  request has run 50 ms, so quick answers never create one. Not landed: it saves a few
  µs per request, but a client that leaves in its first 50 ms is seen 50 ms late.

(The block-wise SSE parser and the one-timer-per-stream deadline, prototyped here
before, have landed: `providers/sse.py`, `streaming._Deadline`.)
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable
from typing import Any

import uvicorn

from proxy import pipeline as _route  # where every route's disconnect watcher lives
from proxy.app import create_app
from proxy.config import load

WATCH_AFTER = 0.05


async def unless_disconnected(work: Awaitable[Any], receive: Any, scope: Any = None) -> Any:
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
