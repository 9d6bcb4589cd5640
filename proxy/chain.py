"""The chain engine: try an alias's entries in order until one answers.

Non-stream: an entry has answered when its whole body is in. Stream: when its first
chunk is in (`_open`, TensorZero's peek_first_chunk): until then a failure moves on,
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
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from .config import Config, Entry
from .errors import AllProvidersFailed, Attempt, ModelNotFound, UpstreamError, UpstreamRejected
from .health import Health
from .limits import Gate
from .policy import falls_back, map_exception
from .providers import Call, Provider, build
from .wire import ChatRequest, Usage

log = logging.getLogger("omnimind.chain")

# Failures worth retrying on the same provider (when `retries` is configured).
_TRANSIENT = frozenset({"connect_error", "timeout", "server_error", "bad_response"})


@dataclass(slots=True)
class Answer:
    """Who answered, how fast, and after which failures; `body` xor `chunks` is set."""

    provider: str
    model: str
    latency_ms: float
    attempts: list[Attempt]
    body: bytes = b""
    usage: Usage | None = None
    chunks: AsyncIterator[bytes] | None = field(default=None, repr=False)
    entry: Entry | None = field(default=None, repr=False)


class Engine:
    """Holds the providers of one config; shared by the HTTP app and the Python API."""

    def __init__(self, config: Config, reuse: dict[str, Provider] | None = None) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {}
        self.gates: dict[str, Gate] = {}
        self.health: dict[str, Health] = {}
        for name, pc in config.providers.items():
            if pc.unavailable is None:
                self.providers[name] = (reuse or {}).get(name) or build(pc)
            self.gates[name] = Gate(pc.spec.max_concurrency, pc.spec.max_queue)
            self.health[name] = Health(pc.spec.breaker)

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
        self, request: ChatRequest, request_id: str = "", prefer: str | None = None
    ) -> Answer:
        return await self._run(request, request_id, prefer, stream=False)

    async def stream(
        self, request: ChatRequest, request_id: str = "", prefer: str | None = None
    ) -> Answer:
        """An answer whose `chunks` start with the first chunk already received."""
        return await self._run(request, request_id, prefer, stream=True)

    async def _run(
        self, request: ChatRequest, request_id: str, prefer: str | None, stream: bool
    ) -> Answer:
        entries = self.chain(request.model, prefer)
        run = _Run(self, request, request_id, stream)
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
        answer.attempts = run.attempts
        return answer

    async def attempt(self, call: Call, stream: bool, budget: float, deadline: float) -> Answer:
        """One call to one entry's provider, under its timeouts and concurrency gate."""
        entry = call.entry
        provider = self.providers[entry.provider]
        gate = self.gates[entry.provider]
        started = time.perf_counter()
        if stream:
            chunks = await _open(
                provider, call, gate, min(entry.first_token_timeout, budget), deadline
            )
            return Answer(entry.provider, entry.model, _ms(started), [], chunks=chunks, entry=entry)
        async with asyncio.timeout(min(entry.timeout, budget)):
            await gate.acquire()
            try:
                result = await provider.complete(call)
            finally:
                gate.release()
        return Answer(
            entry.provider, entry.model, _ms(started), [], result.body, result.usage, entry=entry
        )

    async def aclose(self, keep: Iterable[str] = ()) -> None:
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
            reason = engine.config.providers[name].unavailable or "unavailable"
            self._skip(entry, "unavailable", note=reason)
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
                    await _close(result.chunks)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


async def _open(
    provider: Provider, call: Call, gate: Gate, first_token_timeout: float, deadline: float
) -> AsyncIterator[bytes]:
    """Start a stream and wait for its first chunk; a failure here can still fall back."""
    chunks = provider.stream(call)
    try:
        async with asyncio.timeout(first_token_timeout):
            await gate.acquire()
            try:
                first = await anext(chunks)
            except BaseException:
                gate.release()
                raise
    except StopAsyncIteration:
        await _close(chunks)
        raise UpstreamError("bad_response", "stream ended before its first chunk") from None
    except BaseException:
        await _close(chunks)
        raise
    return _relay(first, chunks, gate, deadline)


async def _relay(
    first: bytes, chunks: AsyncIterator[bytes], gate: Gate, deadline: float
) -> AsyncIterator[bytes]:
    """The committed stream: the first chunk, then the rest, within the request deadline."""
    try:
        yield first
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if asyncio.get_running_loop().time() < deadline:
                    raise  # the upstream went quiet for longer than the entry's timeout
                raise UpstreamError("deadline", "request deadline reached mid-stream") from None
            yield chunk
    finally:
        gate.release()
        await _close(chunks)


async def _close(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
