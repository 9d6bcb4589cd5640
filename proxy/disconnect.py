"""Knowing that a client left: cancel the work done for it (and so its upstream call).

`unless_disconnected(work, receive, scope)` awaits `work` and raises `ClientGone` if the
client disconnects first; `Disconnect` is the watch itself, for a relay that handles the
cancellation on its own. Under `serve` our HTTP protocol reports a lost connection
(`httpproto.ON_DISCONNECT`); under any other server a task waits on `receive()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .httpproto import ON_DISCONNECT

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Disconnect:
    """Cancels the current task when the client disconnects (`gone` says it did).

    Told by our own HTTP protocol when it serves us (`httpproto.ON_DISCONNECT`: no task);
    under any other server, a watcher task waits on `receive()` for `http.disconnect`.
    """

    __slots__ = ("task", "gone", "_watcher", "_hook")
    _watcher: asyncio.Future[None] | None

    def __init__(self, receive: Receive, scope: Scope) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.gone = False
        self._watcher = None
        self._hook = (scope.get("extensions") or _NONE).get(ON_DISCONNECT)
        if self._hook is not None:
            self._hook(self._lost)
        else:
            self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._lost()

    def _lost(self) -> None:
        self.gone = True
        self.task.cancel()

    def stop(self) -> None:
        # Dropped, not only cancelled: the watcher's frame holds this object, and a cycle
        # through its CancelledError would leave garbage for the collector every request.
        hook, self._hook = self._hook, None
        if hook is not None:
            hook(None)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()


_NONE: dict[str, Any] = {}


async def unless_disconnected(work: Awaitable[Any], receive: Receive, scope: Scope) -> Any:
    """Await `work`, cancelling it (and so its upstream call) if the client disconnects."""
    watch = Disconnect(receive, scope)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.gone and watch.task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watch.stop()
