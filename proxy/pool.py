"""The providers of a config: built once, shared across reloads, closed when unused.

A reload builds a new `ProviderPool` from the new config; a provider whose config did
not change is handed over whole (its connections, concurrency gate and health). Each
provider is reference-counted: every attempt holds a `Lease` while it runs (a stream
until it is closed), and a provider that no config uses any more is closed when its last
lease ends, so two reloads during one long request never close a provider in use.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from . import providers
from .config import Config, ProviderConfig
from .health import ProviderHealth
from .limits import Gate
from .providers import Provider

log = logging.getLogger("omnimind.pool")

_INSTALL_HINT = "local providers need: pip install 'omnimind-gateway[local]'"


@dataclass(eq=False, slots=True)
class Held:
    """One provider and what is kept with it across reloads."""

    config: ProviderConfig
    gate: Gate
    health: ProviderHealth
    adapter: Provider | None = None
    unavailable: str | None = None  # why it cannot be used, if it cannot
    leases: int = 0
    pools: int = 0  # pools (configs) that use it
    closing: asyncio.Task[None] | None = field(default=None, repr=False)

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0 and self.pools == 0:
            self._close()

    def _close(self) -> None:
        adapter, self.adapter = self.adapter, None
        if adapter is not None:
            try:
                self.closing = asyncio.get_running_loop().create_task(adapter.aclose())
            except RuntimeError:  # no loop: nothing is running on it either
                pass


class ProviderPool:
    def __init__(self, config: Config, reuse: ProviderPool | None = None) -> None:
        self.held: dict[str, Held] = {}
        self.reused: set[str] = set()
        for name, pc in config.providers.items():
            old = reuse.held.get(name) if reuse is not None else None
            if old is not None and old.config == pc:
                held = old
                self.reused.add(name)
            else:
                held = _build(pc)
            held.pools += 1
            self.held[name] = held
        for held in self.held.values():
            if held.adapter is not None and getattr(held.config.spec, "preload", False):
                preload = getattr(held.adapter, "preload", None)
                if preload is not None:
                    preload(_entries(config, held.config.name))

    def lease(self, name: str) -> Held:
        held = self.held[name]
        held.leases += 1
        return held

    async def aclose(self) -> None:
        """This config is done: close the providers that no other config or lease holds."""
        closing = []
        for held in self.held.values():
            held.pools -= 1
            if held.pools == 0 and held.leases == 0:
                held._close()
                if held.closing is not None:
                    closing.append(held.closing)
        await asyncio.gather(*closing, return_exceptions=True)


def _build(pc: ProviderConfig) -> Held:
    spec = pc.spec
    held = Held(pc, Gate(spec.max_concurrency, spec.max_queue), ProviderHealth(spec.breaker))
    if pc.unavailable is not None:
        held.unavailable = pc.unavailable
        return held
    try:
        held.adapter = providers.build(pc)
    except ImportError as exc:  # e.g. torch absent: the other providers still serve
        held.unavailable = f"cannot load its adapter ({exc}); {_INSTALL_HINT}"
        log.warning("provider %s unavailable: %s", pc.name, held.unavailable)
    return held


def _entries(config: Config, name: str) -> list[object]:
    return [e for chain in config.models.values() for e in chain if e.provider == name]
