"""`within(seconds)`: `asyncio.timeout`'s meaning for the hot path, at a fraction of its cost.

    with within(2.5):
        result = await call()      # TimeoutError if it takes longer

A plain (not async) context manager: one timer armed on entry and cancelled on exit; when
it fires it cancels the task, and the exit turns that cancellation (and only that one:
the task's cancel count says whether someone else asked too) into `TimeoutError`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class within:  # noqa: N801 - used like asyncio.timeout, a function-like name
    __slots__ = ("_seconds", "_task", "_handle", "_cancelling", "_fired")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._fired = False

    def __enter__(self) -> within:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("within() must be used inside a task")
        loop = task.get_loop()
        self._task: asyncio.Task[object] | None = task
        self._cancelling = task.cancelling()
        self._handle: asyncio.TimerHandle | None = loop.call_at(
            loop.time() + self._seconds, self._fire
        )
        return self

    def _fire(self) -> None:
        if self._task is not None:
            self._fired = True
            self._task.cancel()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle, task = self._handle, self._task
        self._handle = self._task = None  # no cycle through the timer's callback
        if handle is not None:
            handle.cancel()
        if self._fired and task is not None:
            if task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from exc
