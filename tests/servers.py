"""Real servers on loopback, each on its own thread and event loop, for the tests."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn
import uvloop
from aiohttp import web


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def refused_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    sock = free_socket()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


class LoopThread:
    """An event loop running on a daemon thread."""

    def __init__(self, uvloop_: bool = False) -> None:
        self.loop = uvloop.new_event_loop() if uvloop_ else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class AiohttpServer:
    """An aiohttp.web app (the fake upstreams) served on a loopback socket."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._thread = LoopThread()
        self._sock = free_socket()
        self.port = int(self._sock.getsockname()[1])
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1)
        self._thread.run(self._start())

    async def _start(self) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._thread.run(self._runner.cleanup())
        self._thread.stop()


def task_count(thread: LoopThread) -> int:
    """Tasks alive on the event loop `thread` runs (the server's own included)."""

    async def count() -> int:
        return len(asyncio.all_tasks())

    return int(thread.run(count()))


class UvicornServer:
    """The gateway (or any ASGI app) served by a real uvicorn on a loopback socket."""

    def __init__(self, app: Any) -> None:
        self._sock = free_socket()
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(app, http="httptools", log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = LoopThread(uvloop_=True)
        self._serving = asyncio.run_coroutine_threadsafe(
            self.server.serve(sockets=[self._sock]), self.thread.loop
        )
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self._serving.done() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def task_count(self) -> int:
        """Tasks alive on the gateway's event loop (the server's own included)."""
        return task_count(self.thread)

    def close(self) -> None:
        self.server.should_exit = True
        self._serving.result(15)
        self.thread.stop()
        self._sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(probe: Callable[[], int], target: int, slack: int = 0, within: float = 3.0) -> int:
    """Poll `probe` until it is at most target + slack (or time runs out); return the last value."""
    deadline = time.monotonic() + within
    value = probe()
    while value > target + slack and time.monotonic() < deadline:
        time.sleep(0.02)
        value = probe()
    return value
