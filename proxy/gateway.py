"""The running gateway's state: the current engine, swapped whole on a config reload.

A reload (models.yaml edited, or SIGHUP) builds a new `Engine` from the new file and
swaps it in atomically; providers whose config did not change are handed over with
their connection pools, breaker state and concurrency gates. Requests in flight finish
on the old engine, which closes its own providers once drained. An invalid file (bad
YAML, unreadable, not UTF-8, an audit_log path that cannot be opened, a bad CIDR) is
rejected with one log line and the old config keeps serving, auditing included.

The watcher watches the config file's own folder, not recursively, for that file name only.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import redact
from .audit import AuditLog
from .auth import Caller, Guard
from .config import Config, ConfigError, load
from .edge import BrowserGuard, ClientAddress, check_body
from .engine import Engine
from .logs import ProviderStates
from .observe import Observer
from .redact import Redactor
from .state.gauge import degraded_gauge
from .translate.responses_store import ResponseStore

log = logging.getLogger("omnimind.gateway")
_GC_THRESHOLDS = (20_000, 20, 20)


@dataclass(frozen=True, slots=True)
class EdgeRules:
    """What the request pipeline checks per request, built from one config."""

    redactor: Redactor
    browser: BrowserGuard
    client_address: ClientAddress
    max_json_depth: int

    @classmethod
    def from_config(cls, config: Config) -> EdgeRules:
        """ConfigError if the config's server rules cannot be applied (a bad CIDR)."""
        server = config.server
        try:
            client_address = ClientAddress.from_server(server)
        except ConfigError as exc:
            raise ConfigError(f"{config.path}: {exc}") from None
        return cls(
            Redactor.from_config(config),
            BrowserGuard.from_server(server, keyless=not config.api_keys),
            client_address,
            server.max_json_depth,
        )


def open_audit(config: Config) -> AuditLog:
    """The config's audit log; ConfigError (naming the key) if its path cannot be opened."""
    try:
        return AuditLog(config.server.audit_log, config.server.audit_buffer)
    except OSError as exc:
        raise ConfigError(
            f"{config.path}: at server.audit_log: cannot open {config.server.audit_log!r}: "
            f"{exc.strerror or exc}"
        ) from None


def preflight(config: Config) -> None:
    """Everything `Gateway(config)` would refuse, as a ConfigError, for the CLI to print."""
    EdgeRules.from_config(config)
    open_audit(config).close()


class Gateway:
    """`audit=False` (the in-process router): no audit log, whatever the config says."""

    def __init__(self, config: Config, audit: bool = True) -> None:
        self._audit = audit
        self.edge = EdgeRules.from_config(config)
        self.observer = Observer(
            set(config.models),
            config.server.log_content,
            open_audit(config) if audit else AuditLog("off"),
            self.edge.redactor,
        )
        self.log_filter = redact.LogFilter(self.edge.redactor)
        self.redact = self.edge.redactor.text  # the one redaction of outgoing text
        self.states = ProviderStates()
        self.engine = Engine(config, self.observer, redact=self.redact, states=self.states)
        self.guard = Guard(config)
        self._on_degraded = degraded_gauge(self.observer.metrics.registry)
        self.guard.watch(self._on_degraded)
        self.created = int(time.time())
        self.responses = ResponseStore()  # for the Responses API's previous_response_id
        self._background: set[asyncio.Task[Any]] = set()
        path = Path(config.path)
        self._watched = path.resolve() if path.is_file() else None

    @property
    def config(self) -> Config:
        return self.engine.config

    @property
    def redactor(self) -> Redactor:
        return self.edge.redactor

    async def authorize(
        self, headers: Mapping[str, str], client: str, admit: bool = True
    ) -> Caller:
        """Who asks (401 if the key is wrong); with `admit`, also their limits (429)."""
        caller = self.guard.identify(headers, client)
        if admit:
            await self.guard.admit(caller)
        return caller

    def edge_check(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """Checks on where a request comes from, before its key is looked at: without
        api_keys a web page must not drive the gateway (403 / 415 / 421)."""
        server = scope.get("server")
        self.edge.browser.check(scope["method"], headers, server[0] if server else None)

    def client_address(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> str:
        """The peer, or behind `server.trusted_proxies` the X-Forwarded-For client."""
        client = scope.get("client")
        return self.edge.client_address.of(str(client[0]) if client else "", headers)

    def check_body(self, body: bytes) -> None:
        """400 unless the body is UTF-8 JSON nesting at most `server.max_json_depth`."""
        check_body(body, self.edge.max_json_depth)

    def preflight(self, headers: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """The answer to `OPTIONS /v1/...` (CORS preflight): status and headers."""
        return self.edge.browser.preflight(headers)

    def cors_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Headers for an answer to a listed browser origin ({} for anyone else)."""
        return self.edge.browser.cors_headers(headers)

    def ready(self) -> dict[str, bool]:
        """Each preloaded local provider: loaded yet?"""
        return self.engine.readiness()

    async def reload(self) -> bool:
        """Load the config file again and swap it in; False (old config kept) if it is bad."""
        old = self.engine
        audit = None
        try:
            config = load(old.config.path)
            edge = EdgeRules.from_config(config)
            if self._audit and config.server.audit_log != self.observer.audit.target:
                audit = open_audit(config)
            new = Engine(
                config, self.observer, reuse=old, redact=edge.redactor.text, states=self.states
            )
        except (ConfigError, OSError, ValueError) as exc:  # ValueError: not UTF-8
            if audit is not None:
                audit.close()
            log.error("config reload rejected, still serving the previous config: %s", exc)
            return False
        guard = Guard(config)
        guard.inherit(self.guard)
        guard.watch(self._on_degraded)
        self.observer.aliases = set(config.models)
        self.observer.log_content = config.server.log_content
        self.observer.redactor = self.log_filter.redactor = edge.redactor
        self.redact = edge.redactor.text
        if audit is not None:
            self.observer.replace_audit(audit)
        self.engine, self.guard, self.edge = new, guard, edge
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
            # A request makes a few hundred short-lived containers, nearly all freed by
            # reference counting: young collections every 700 allocations mostly walk the
            # requests in flight. Every 20,000 they cost a tenth as much (bench/).
            gc.set_threshold(*_GC_THRESHOLDS)
        redact.install(self.log_filter)
        self.engine.start_probes()
        if self._watched is not None:
            self._spawn(self._watch(self._watched))
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            # Only the main thread may handle signals; tests run servers on others.
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self._reload_quietly()))

    async def _watch(self, path: Path) -> None:
        from watchfiles import awatch  # ships with uvicorn[standard]

        def ours(_change: object, changed: str) -> bool:
            return Path(changed) == path

        while True:
            try:
                # The folder (editors often replace a file rather than write it), but only
                # its own entries: never a checkout's .venv or another nested models.yaml.
                async for _ in awatch(
                    path.parent, watch_filter=ours, recursive=False, debounce=200, step=50
                ):
                    await self._reload_quietly()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken watcher must not take the gateway down
                log.exception("config file watcher failed; watching again in 5 s")
                await asyncio.sleep(5)

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except Exception:  # an unforeseen fault in one reload must not end the watching
            log.exception("config reload failed; still serving the previous config")

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.engine.aclose()
        await self.guard.aclose()
        self.observer.audit.close()
        redact.uninstall(self.log_filter)
