"""The chain engine: try an alias's entries in order until one answers.

Non-stream: an entry has answered when its whole body is in. Stream: when its first
chunk is in (`streaming.open_stream`, TensorZero's peek_first_chunk): until then a failure moves on,
after it the answer is committed to that entry. Every failed or skipped entry is kept,
in order, as an `Attempt`; when all fail, `AllProvidersFailed` carries them all.

Before an entry is called its provider's `Health` may skip it (circuit open, cooling
down after a Retry-After) at no cost. With `hedge_after_ms` an alias starts its next
entry too when the first has not answered in time, serves the first to answer and
cancels the other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

from .config import Config, Entry
from .errors import (
    AllProvidersFailed,
    Attempt,
    GatewayError,
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
)
from .health import Health
from .limits import Gate
from .observe import Observer, RequestRecord, cost_usd
from .policy import falls_back, map_exception
from .providers import Call, Provider, build
from .streaming import Answer, close_stream, open_stream
from .wire import ChatRequest

_any = msgspec.json.Decoder()

log = logging.getLogger("omnimind.chain")

_INSTALL_HINT = "local providers need: pip install 'omnimind-gateway[local]'"
# Failures worth retrying on the same provider (when `retries` is configured).
_TRANSIENT = frozenset({"connect_error", "timeout", "server_error", "bad_response"})


class Engine:
    """Holds the providers of one config; shared by the HTTP app and the Python API."""

    def __init__(
        self,
        config: Config,
        observer: Observer | None = None,
        reuse: Engine | None = None,
    ) -> None:
        """`reuse`: the engine this one replaces; unchanged providers keep their pools and state."""
        self.config = config
        # Without an observer from the gateway: metrics and counters, no audit file.
        self.observer = observer or Observer(set(config.models), config.server.log_content)
        self.providers: dict[str, Provider] = {}
        self.gates: dict[str, Gate] = {}
        self.health: dict[str, Health] = {}
        self.reused: set[str] = set()
        self.unavailable: dict[str, str] = {}  # provider -> why it cannot be used
        self.active = 0  # requests in flight (a reload drains them before closing providers)
        for name, pc in config.providers.items():
            if reuse is not None and reuse.config.providers.get(name) == pc:
                self.reused.add(name)
                if name in reuse.providers:
                    self.providers[name] = reuse.providers[name]
                elif name in reuse.unavailable:
                    self.unavailable[name] = reuse.unavailable[name]
                self.gates[name], self.health[name] = reuse.gates[name], reuse.health[name]
                continue
            if pc.unavailable is not None:
                self.unavailable[name] = pc.unavailable
            else:
                try:
                    self.providers[name] = build(pc)
                except ImportError as exc:  # e.g. torch absent: the other providers still serve
                    self.unavailable[name] = f"cannot load its adapter ({exc}); {_INSTALL_HINT}"
                    log.warning("provider %s unavailable: %s", name, self.unavailable[name])
            self.gates[name] = Gate(pc.spec.max_concurrency, pc.spec.max_queue)
            self.health[name] = Health(pc.spec.breaker)
        for name, provider in self.providers.items():
            # Local providers may load their models now rather than on first use.
            preload = getattr(provider, "preload", None)
            if preload is not None and getattr(config.providers[name].spec, "preload", False):
                preload(
                    [e for chain in config.models.values() for e in chain if e.provider == name]
                )

    def chain(self, alias: str, prefer: str | None = None) -> tuple[Entry, ...]:
        entries = self.config.models.get(alias)
        if entries is None:
            raise ModelNotFound(
                f"The model '{alias}' does not exist. Available models: "
                + ", ".join(self.config.models),
                param="model",
            )
        if prefer:
            first = tuple(e for e in entries if e.provider == prefer)
            entries = first + tuple(e for e in entries if e.provider != prefer)
        return entries

    async def complete(
        self, request: ChatRequest, request_id: str = "", prefer: str | None = None,
        key_id: str = "",
    ) -> Answer:  # fmt: skip
        return await self._run(request, request_id, prefer, False, key_id)

    async def stream(
        self, request: ChatRequest, request_id: str = "", prefer: str | None = None,
        key_id: str = "",
    ) -> Answer:  # fmt: skip
        """An answer whose `chunks` start with the first chunk already received."""
        return await self._run(request, request_id, prefer, True, key_id)

    async def _run(
        self, request: ChatRequest, request_id: str, prefer: str | None, stream: bool,
        key_id: str,
    ) -> Answer:  # fmt: skip
        started = time.perf_counter()
        self.active += 1
        rec = RequestRecord(request_id, request.model, stream, key_id=key_id)
        if self.observer.log_content:
            rec.messages = _any.decode(request.fields["messages"])
        run = _Run(self, request, request_id, stream)
        try:
            entries = self.chain(request.model, prefer)
            hedge = self.config.hedges.get(request.model)
            if hedge is not None and len(entries) > 1:
                answer = await run.hedged(entries, hedge)
            else:
                answer = None
                for entry in entries:
                    answer = await run.try_entry(entry)
                    if answer is not None or run.expired():
                        break
            if answer is None:
                raise AllProvidersFailed(request.model, run.attempts, run.retry_after)
        except GatewayError as exc:
            rec.status, rec.error = exc.status, exc.message[:300]
            rec.outcome = "failed" if isinstance(exc, AllProvidersFailed) else "rejected"
            self._finish(rec, run.attempts, started)
            raise
        except asyncio.CancelledError:
            rec.status, rec.outcome = 499, "cancelled"
            self._finish(rec, run.attempts, started)
            raise
        answer.attempts = run.attempts
        rec.provider, rec.model, rec.latency_ms = answer.provider, answer.model, answer.latency_ms
        if stream:
            answer.on_end = lambda outcome: self._stream_ended(rec, answer, outcome, started)
        else:
            self._account(rec, answer)
            self._finish(rec, run.attempts, started)
        return answer

    def _account(self, rec: RequestRecord, answer: Answer) -> None:
        usage, entry = answer.usage, answer.entry
        if usage is not None:
            rec.prompt_tokens, rec.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        if entry is not None:
            answer.cost_usd = rec.cost_usd = cost_usd(
                rec.prompt_tokens, rec.completion_tokens,
                entry.input_cost_per_mtok, entry.output_cost_per_mtok,
            )  # fmt: skip

    def _stream_ended(
        self, rec: RequestRecord, answer: Answer, outcome: str, started: float
    ) -> None:
        rec.outcome = outcome
        self._account(rec, answer)
        self._finish(rec, answer.attempts, started)

    def _finish(self, rec: RequestRecord, attempts: list[Attempt], started: float) -> None:
        self.active -= 1
        rec.attempts = attempts
        rec.duration_ms = _ms(started)
        try:
            self.observer.finished(rec)
        except Exception:  # observation must never break an answer
            log.exception("recording request %s failed", rec.request_id)

    async def attempt(self, call: Call, stream: bool, budget: float, deadline: float) -> Answer:
        """One call to one entry's provider, under its timeouts and concurrency gate."""
        entry = call.entry
        provider = self.providers[entry.provider]
        gate = self.gates[entry.provider]
        started = time.perf_counter()
        if stream:
            answer = Answer(entry.provider, entry.model, 0.0, [], entry=entry)
            first_token = min(entry.first_token_timeout, budget)
            answer.chunks = await open_stream(provider, call, gate, first_token, deadline, answer)
            answer.latency_ms = _ms(started)
            return answer
        async with asyncio.timeout(min(entry.timeout, budget)):
            await gate.acquire()
            try:
                result = await provider.complete(call)
            finally:
                gate.release()
        return Answer(
            entry.provider, entry.model, _ms(started), [], result.body, result.usage, entry=entry
        )

    def provider_status(self) -> dict[str, Any]:
        """Each provider's availability, breaker state, cooldown, last error and latency."""
        data = []
        for name, pc in self.config.providers.items():
            health = self.health[name].snapshot()
            gate = self.gates[name]
            available = (
                name in self.providers
                and health["state"] != "open"
                and health["cooldown_remaining_s"] == 0
            )
            data.append({
                "id": name,
                "type": type(pc.spec).__struct_config__.tag,
                "available": available,
                "unavailable_reason": self.unavailable.get(name),
                "in_flight": gate.in_use,
                "queued": gate.waiting,
                **health,
            })  # fmt: skip
        return {"object": "list", "data": data}

    async def aclose(self, keep: Iterable[str] = ()) -> None:
        """Close providers, except those named in `keep` (handed on to a newer engine)."""
        keep = set(keep)
        closing = [p.aclose() for name, p in self.providers.items() if name not in keep]
        await asyncio.gather(*closing, return_exceptions=True)


class _Run:
    """One request's walk down its chain: the attempts so far and the deadline."""

    def __init__(self, engine: Engine, request: ChatRequest, request_id: str, stream: bool):
        self.engine = engine
        self.request = request
        self.request_id = request_id
        self.stream = stream
        self.attempts: list[Attempt] = []
        self.retry_after: float | None = None
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + engine.config.server.request_timeout

    def expired(self) -> bool:
        return self.loop.time() >= self.deadline

    def _skip(self, entry: Entry, reason: str, wait: float | None = None, note: str = "") -> None:
        self.attempts.append(Attempt(entry.provider, entry.model, reason, message=note))
        if wait is not None:
            self.retry_after = wait if self.retry_after is None else min(self.retry_after, wait)

    async def try_entry(self, entry: Entry) -> Answer | None:
        """Every try at one entry (1 + its provider's retries); None once it has failed."""
        engine, name = self.engine, entry.provider
        if name not in engine.providers:
            self._skip(entry, "unavailable", note=engine.unavailable.get(name, ""))
            return None
        spec = engine.config.providers[name].spec
        health = engine.health[name]
        for n in range(spec.retries + 1):
            if n:
                pause = spec.retry_backoff * 2 ** (n - 1) * random.uniform(0.5, 1.5)
                await asyncio.sleep(min(pause, max(0.0, self.deadline - self.loop.time())))
            verdict = health.admit()
            if verdict is not None:
                self._skip(entry, verdict[0], verdict[1])
                return None
            budget = self.deadline - self.loop.time()
            if budget <= 0:
                health.abandon()
                self._skip(entry, "deadline")
                return None
            started = time.perf_counter()
            try:
                answer = await engine.attempt(
                    Call(self.request, entry, self.request_id), self.stream, budget, self.deadline
                )
            except asyncio.CancelledError:
                health.abandon()
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                error = map_exception(exc)
                health.failure(error)
                if not falls_back(error):
                    raise UpstreamRejected(
                        error.status or 400, error.message, param=error.param, code=error.code
                    ) from None
                self._failed(entry, error, _ms(started))
                if error.reason not in _TRANSIENT:
                    return None
                continue
            health.success(answer.latency_ms)
            return answer
        return None

    def _failed(self, entry: Entry, error: UpstreamError, latency: float) -> None:
        if error.reason == "rate_limited" and error.retry_after is not None:
            wait = error.retry_after
            self.retry_after = wait if self.retry_after is None else min(self.retry_after, wait)
        self.attempts.append(
            Attempt(entry.provider, entry.model, error.reason, error.status, latency, error.message)
        )
        log.warning(
            "attempt failed: provider=%s model=%s reason=%s status=%s latency_ms=%.1f %s",
            entry.provider, entry.model, error.reason, error.status, latency, error.message,
            extra={"request_id": self.request_id},
        )  # fmt: skip

    async def hedged(self, entries: tuple[Entry, ...], delay: float) -> Answer | None:
        """At most two entries in flight: the next starts when the first is slow or fails."""
        waiting = deque(entries)
        running: dict[asyncio.Task[Answer | None], Entry] = {}

        def launch() -> None:
            if waiting:
                entry = waiting.popleft()
                running[asyncio.ensure_future(self.try_entry(entry))] = entry

        launch()
        try:
            while running:
                hedge_now = len(running) == 1 and waiting
                done, _ = await asyncio.wait(
                    running, timeout=delay if hedge_now else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if not done:
                    launch()
                    continue
                for task in done:
                    del running[task]
                    answer = task.result()
                    if answer is not None:
                        return answer
                if not self.expired():
                    launch()
            return None
        finally:
            for task, entry in running.items():
                task.cancel()
                self.attempts.append(Attempt(entry.provider, entry.model, "hedge_lost"))
            for result in await asyncio.gather(*running, return_exceptions=True):
                if isinstance(result, Answer) and result.chunks is not None:
                    await close_stream(result.chunks)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
