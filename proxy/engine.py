"""The engine of one config: its providers (`pool`), its chains (`chain.Walk`), its books.

Shared by the HTTP pipeline and the Python API. A reload builds a new engine that takes
over the unchanged providers (`ProviderPool(reuse=...)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from . import providers
from .accounting import Ledger
from .chain import Walk
from .config import Config, Entry
from .errors import AllProvidersFailed, GatewayError, InvalidRequest, ModelNotFound
from .health import HealthSnapshot
from .logs import ProviderStates
from .observe import Observer, RequestRecord
from .pool import ProviderPool
from .providers import Call, Op
from .streaming import Answer
from .wire import ApiRequest

log = logging.getLogger("omnimind.engine")
_KIND_OF_OP = {Op.CHAT: "chat", Op.COMPLETION: "chat", Op.EMBEDDING: "embedding"}
_CLIENT_TEXT = 256  # characters of a client-given string kept in records


class Info(msgspec.Struct, frozen=True):
    """Who asked: the request id, an optional preferred provider, the gateway key's id."""

    request_id: str = ""
    prefer: str | None = None
    key_id: str = ""


_ANONYMOUS = Info()


class ProviderStatus(msgspec.Struct):
    """`/v1/providers`: one provider now, host health flattened, deployments below."""

    id: str
    type: str
    available: bool
    reachable: bool | None
    unavailable_reason: str | None
    in_flight: int
    queued: int
    state: str
    consecutive_failures: int
    ejections: int
    circuit_open_remaining_s: float
    cooldown_remaining_s: float
    latency_ms: object
    ttft_ms: object
    requests: int
    successes: int
    errors: int
    last_error: object
    deployments: dict[str, HealthSnapshot]
    local: dict[str, Any] | None = None  # a local provider's models: engine, load, batching


class Engine:
    def __init__(
        self,
        config: Config,
        observer: Observer | None = None,
        reuse: Engine | None = None,
        redact: Callable[[str], str] = str,
        states: ProviderStates | None = None,
    ) -> None:
        self.config = config
        # Without an observer from the gateway: metrics and counters, no audit file.
        self.observer = observer or Observer(set(config.models), config.server.log_content)
        self.pool: ProviderPool = ProviderPool(config, reuse.pool if reuse is not None else None)
        self.reused = self.pool.reused
        self.redact = redact
        self.states = states or ProviderStates()  # logs a breaker opening / closing once
        self.active = 0  # requests in flight
        self._probes: list[asyncio.Task[None]] = []

    def chain(self, alias: str, prefer: str | None = None) -> tuple[Entry, ...]:
        entries = self.config.models.get(alias)
        if entries is None:
            shown = alias if len(alias) <= 64 else alias[:61] + "..."
            raise ModelNotFound(
                f"The model '{shown}' does not exist. Available models: "
                + ", ".join(self.config.models),
                param="model",
            )
        if prefer:
            first = tuple(e for e in entries if e.provider == prefer)
            entries = first + tuple(e for e in entries if e.provider != prefer)
        return entries

    # complete/stream hand back `_run`'s coroutine: one frame less on every resumption.
    def complete(
        self, request: ApiRequest, op: Op = Op.CHAT, info: Info = _ANONYMOUS
    ) -> Coroutine[Any, Any, Answer]:
        return self._run(request, op, info, False)

    def stream(
        self, request: ApiRequest, op: Op = Op.CHAT, info: Info = _ANONYMOUS
    ) -> Coroutine[Any, Any, Answer]:
        """An answer whose `stream` starts with the first chunk already received."""
        return self._run(request, op, info, True)

    async def _run(self, request: ApiRequest, op: Op, info: Info, stream: bool) -> Answer:
        self.active += 1
        rec = RequestRecord(
            info.request_id, request.model[:_CLIENT_TEXT], stream, key_id=info.key_id
        )
        if self.observer.log_content and "messages" in request.fields:
            rec.messages = msgspec.json.decode(request.fields["messages"])
        ledger = Ledger(self.observer, rec, self._done)
        walk = Walk(self, Call(request, _NO_ENTRY, info.request_id, op), info, stream, ledger)
        try:
            entries = self.chain(request.model, info.prefer)
            kind = self.config.kinds.get(request.model, "chat")
            if kind != _KIND_OF_OP[op]:
                raise InvalidRequest(
                    f"The model '{request.model}' is {'an' if kind == 'embedding' else 'a'} "
                    f"{kind} model; it cannot serve {op} requests.",
                    param="model", code="wrong_model_kind",
                )  # fmt: skip
            answer = await walk.run(entries)
        except GatewayError as exc:
            outcome = "failed" if isinstance(exc, AllProvidersFailed) else "rejected"
            ledger.settle(
                walk.attempts, outcome=outcome, status=exc.status, error=exc.message[:300]
            )
            raise
        except asyncio.CancelledError:
            ledger.settle(walk.attempts, outcome="cancelled", status=499)
            raise
        except BaseException:
            ledger.settle(walk.attempts, outcome="failed", status=500)
            raise
        rec.provider, rec.model, rec.latency_ms = answer.provider, answer.model, answer.latency_ms
        if answer.stream is None:
            answer.cost_usd = ledger.settle(walk.attempts, usage=answer.usage, entry=answer.entry)
        return answer

    def _done(self) -> None:
        self.active -= 1

    def provider_status(self) -> list[ProviderStatus]:
        """Each provider now: can it serve, its breakers, cooldowns, last error, latency."""
        data = []
        for name, held in self.pool.held.items():
            host = held.health.host.snapshot()
            data.append(
                ProviderStatus(
                    id=name,
                    type=held.config.type,
                    available=held.adapter is not None and held.health.available(),
                    reachable=held.health.reachable,
                    unavailable_reason=held.unavailable,
                    in_flight=held.gate.in_use,
                    queued=held.gate.waiting,
                    deployments={m: h.snapshot() for m, h in held.health.deployments.items()},
                    local=_local_stats(held.adapter),
                    **{f: getattr(host, f) for f in host.__struct_fields__},
                )
            )
        return data

    def readiness(self) -> dict[str, bool]:
        """Each provider with `preload: true`: are its models loaded?"""
        out = {}
        for name, held in self.pool.held.items():
            if getattr(held.config.spec, "preload", False) and held.adapter is not None:
                ready = getattr(held.adapter, "ready", None)
                out[name] = bool(ready()) if ready is not None else True
        return out

    def start_probes(self) -> None:
        """Probe providers every `health_check_interval` s (probes never count as requests)."""
        for held in self.pool.held.values():
            interval = held.config.spec.health_check_interval
            if interval and held.adapter is not None:
                self._probes.append(
                    asyncio.ensure_future(self._probe_every(held.config.name, interval))
                )

    async def _probe_every(self, name: str, interval: float) -> None:
        held = self.pool.held[name]
        while True:
            try:
                probe = await providers.probe(held.config)
                held.health.reachable = probe.ok
            except Exception:  # noqa: BLE001 - unreachable is the answer
                held.health.reachable = False
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        """This config is done; providers still used by a newer config or a stream stay open."""
        for task in self._probes:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._probes, return_exceptions=True)
        await self.pool.aclose()


_NO_ENTRY = Entry(provider="", model="", timeout=1.0, connect_timeout=1.0, first_token_timeout=1.0)


def _local_stats(adapter: Any) -> dict[str, Any] | None:
    stats = getattr(adapter, "stats", None)
    return stats() if callable(stats) else None
