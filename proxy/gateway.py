"""The running gateway's state: the current engine, swapped whole on a config reload.

A reload (models.yaml edited, or SIGHUP) builds a new `Engine` from the new file and
swaps it in atomically; providers whose config did not change are handed over with
their connection pools, breaker state and concurrency gates. Requests in flight finish
on the old engine, which closes its own providers once drained. An invalid file is
rejected with one log line and the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from .auth import Caller, Guard
from .config import Config, ConfigError, load
from .engine import Engine
from .observe import AuditLog, Observer
from .state.gauge import degraded_gauge

log = logging.getLogger("omnimind.gateway")


class Gateway:
    """`audit=False` (the in-process router): no audit log, whatever the config says."""

    def __init__(self, config: Config, audit: bool = True) -> None:
        self._audit = audit
        self.observer = Observer(
            set(config.models),
            config.server.log_content,
            config.server.audit_log if audit else "off",
        )
        self.redact = _redactor(config)
        self.engine = Engine(config, self.observer, redact=self.redact)
        self.guard = Guard(config)
        self._on_degraded = degraded_gauge(self.observer.metrics.registry)
        self.guard.watch(self._on_degraded)
        self.created = int(time.time())
        self._background: set[asyncio.Task[Any]] = set()
        path = Path(config.path)
        self._watched = path.resolve() if path.is_file() else None

    @property
    def config(self) -> Config:
        return self.engine.config

    async def authorize(
        self, headers: Mapping[str, str], client: str, admit: bool = True
    ) -> Caller:
        """Who asks (401 if the key is wrong); with `admit`, also their limits (429)."""
        caller = self.guard.identify(headers, client)
        if admit:
            await self.guard.admit(caller)
        return caller

    def edge_check(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """Checks on where a request comes from, before its key is looked at."""

    def client_address(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> str:
        client = scope.get("client")
        return str(client[0]) if client else ""

    def ready(self) -> dict[str, bool]:
        """Each preloaded local provider: loaded yet?"""
        return self.engine.readiness()

    async def reload(self) -> bool:
        """Load the config file again and swap it in; False (old config kept) if it is bad."""
        old = self.engine
        try:
            config = load(old.config.path)
        except ConfigError as exc:
            log.error("config reload rejected, still serving the previous config: %s", exc)
            return False
        self.redact = _redactor(config)
        new = Engine(config, self.observer, reuse=old, redact=self.redact)
        guard = Guard(config)
        guard.inherit(self.guard)
        guard.watch(self._on_degraded)
        self.observer.aliases = set(config.models)
        self.observer.log_content = config.server.log_content
        if self._audit and config.server.audit_log != self.observer.audit.target:
            self.observer.audit.close()
            self.observer.audit = AuditLog(config.server.audit_log)
        self.engine, self.guard = new, guard
        log.info(
            "config reloaded from %s: aliases %s; providers kept %s",
            config.path, ", ".join(config.models), ", ".join(sorted(new.reused)) or "none",
        )  # fmt: skip
        new.start_probes()
        self._spawn(self._retire(old, keep=new.reused))
        return True

    async def _retire(self, old: Engine, keep: set[str]) -> None:
        deadline = time.monotonic() + old.config.server.request_timeout
        while old.active > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.05)  # probes stop then; providers close when unleased
        await old.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self, freeze: bool = True) -> None:
        """Watch the config file and SIGHUP for reloads; freeze start-up objects."""
        if freeze:  # the server's own process only: not in someone else's (the router)
            # Start-up leaves ~70k long-lived objects; frozen, full collections skip them
            # (bench/: p99 at concurrency 32 from ~54 ms to ~20 ms).
            gc.collect()
            gc.freeze()
        self.engine.start_probes()
        if self._watched is not None:
            self._spawn(self._watch(self._watched))
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            # Only the main thread may handle signals; tests run servers on others.
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))

    async def _watch(self, path: Path) -> None:
        from watchfiles import awatch  # ships with uvicorn[standard]

        def ours(_change: object, changed: str) -> bool:
            return Path(changed).name == path.name

        try:
            # The folder, not the file: editors often replace a file rather than write it.
            async for _ in awatch(path.parent, watch_filter=ours, debounce=200, step=50):
                await self.reload()
        except Exception:  # a broken watcher must not take the gateway down
            log.exception("config file watcher stopped; SIGHUP still reloads")

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.engine.aclose()
        await self.guard.aclose()
        self.observer.audit.close()


def _redactor(config: Config) -> Callable[[str], str]:
    """Every configured secret out of a text (see redact.py for the full treatment)."""
    secrets = sorted(config.secrets(), key=len, reverse=True)
    if not secrets:
        return str
    pattern = re.compile("|".join(re.escape(s) for s in secrets))
    return lambda text: pattern.sub("********", text) if text else text
