"""Real servers on loopback, each on its own thread and event loop, for the tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

import uvicorn
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

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
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


class UvicornServer:
    """The gateway (or any ASGI app) served by a real uvicorn on a loopback socket."""

    def __init__(self, app: Any) -> None:
        self._sock = free_socket()
        self.port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app, loop="uvloop", http="httptools", log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._sock.close()
