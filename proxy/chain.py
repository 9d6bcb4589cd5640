"""The chain walk: try an alias's entries in order until one answers.

Non-stream: an entry has answered when its whole body is in. Stream: when its first chunk
is in; until then a failure moves on, after it the answer is committed to that entry
(`streaming.OwnedStream`). Every failed or skipped entry is kept, in order, as an
`Attempt`; when all fail, `AllProvidersFailed` carries them all.

Before an entry is called it may be skipped at no cost: its provider is unavailable, its
deployment or host is open or cooling (`health.ProviderHealth`), or the request cannot
fit its `context_window`. Waiting for a provider's concurrency slot is not part of an
attempt's timeout: it is bounded by the request deadline only. With `hedge_after_ms` an
alias starts its next entry too when the first has not answered in time, serves the first
to answer and cancels the other.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING

from .accounting import Ledger
from .config import Entry
from .errors import AllProvidersFailed, Attempt, UpstreamError, UpstreamRejected
from .health import Ticket
from .policy import map_exception
from .pool import Held
from .providers import Call
from .reasons import Reason
from .streaming import Answer, OwnedStream, close_stream, first_chunk
from .timer import within
from .tokens import estimate_prompt

if TYPE_CHECKING:
    from .engine import Engine, Info

log = logging.getLogger("omnimind.chain")


class Walk:
    """One request's walk down its chain: the attempts so far and the deadline."""

    def __init__(self, engine: Engine, call: Call, info: Info, stream: bool, ledger: Ledger):
        self.engine = engine
        self.call = call
        self.info = info
        self.stream = stream
        self.ledger = ledger
        self.attempts: list[Attempt] = []
        self.retry_after: float | None = None
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + engine.config.server.request_timeout
        self._prompt_tokens: int | None = None
        self.committed: Answer | None = None  # the answer served (a hedge's loser is not)

    def expired(self) -> bool:
        return self.loop.time() >= self.deadline

    async def run(self, entries: tuple[Entry, ...]) -> Answer:
        hedge = self.engine.config.hedges.get(self.call.request.model)
        if hedge is not None and len(entries) > 1:
            answer = await self.hedged(entries, hedge)
        else:
            answer = None
            for entry in entries:
                answer = await self.try_entry(entry)
                if answer is not None or self.expired():
                    break
        if answer is None:
            windows = [e.context_window for e in entries if e.context_window is not None]
            raise AllProvidersFailed(
                self.call.request.model, self.attempts, self.retry_after, max(windows, default=None)
            )
        answer.attempts = self.attempts
        self.committed = answer
        return answer

    def _skip(
        self, entry: Entry, reason: Reason, wait: float | None = None, note: str = ""
    ) -> None:
        self.attempts.append(Attempt(entry.provider, entry.model, reason, message=note))
        if wait is not None:
            self.retry_after = wait if self.retry_after is None else min(self.retry_after, wait)

    def _too_long(self, entry: Entry) -> str | None:
        window = entry.context_window
        if window is None:
            return None
        if self._prompt_tokens is None:
            self._prompt_tokens = estimate_prompt(self.call.request)
        need = self._prompt_tokens + (self.call.request.max_tokens() or 0)
        if need <= window:
            return None
        return f"needs about {need} tokens (prompt + max_tokens); context window is {window}"

    async def try_entry(self, entry: Entry) -> Answer | None:
        """Every try at one entry (1 + its provider's retries); None once it has failed."""
        held = self.engine.pool.held[entry.provider]
        if held.adapter is None:
            self._skip(entry, Reason.UNAVAILABLE, note=held.unavailable or "")
            return None
        too_long = self._too_long(entry)
        if too_long is not None:
            self._skip(entry, Reason.CONTEXT_TOO_LONG, note=too_long)
            return None
        spec = held.config.spec
        for n in range(spec.retries + 1):
            if n:
                pause = spec.retry_backoff * 2 ** (n - 1) * random.uniform(0.5, 1.5)
                await asyncio.sleep(min(pause, max(0.0, self.deadline - self.loop.time())))
            ticket = held.health.admit(entry.model)
            if not isinstance(ticket, Ticket):
                self._skip(entry, *ticket)
                return None
            if self.expired():
                held.health.abandon(entry.model)
                self._skip(entry, Reason.DEADLINE)
                return None
            started = time.perf_counter()
            try:
                answer = await self._attempt(held, entry)
            except asyncio.CancelledError:
                held.health.abandon(entry.model)
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                error = self._redacted(map_exception(exc))
                exc.__traceback__ = None  # `error` may be `exc`: its frames would hold it
                held.health.failure(entry.model, error, ticket)
                self._states(held, entry, str(error.reason))
                self._failed(entry, error, _ms(started))
                if not error.reason.falls_back:
                    raise UpstreamRejected(
                        error.status or 400, error.message, param=error.param, code=error.code,
                        attempts=self.attempts,
                    ) from None  # fmt: skip
                if not error.reason.retry_same:
                    return None
                continue
            if answer.stream is None:
                held.health.success(entry.model, answer.latency_ms)
            else:  # the verdict comes when the stream ends (`_stream_closed`)
                held.health.started(entry.model, answer.latency_ms)
            self._states(held, entry)
            return answer
        return None

    async def _attempt(self, held: Held, entry: Entry) -> Answer:
        """One call to one entry's provider: wait for a slot, then call under its timeouts."""
        adapter = held.adapter
        assert adapter is not None
        call = Call(self.call.request, entry, self.info.request_id, self.call.op)
        queued = time.perf_counter()
        held.leases += 1
        if not held.gate.try_acquire():
            await self._wait_for_slot(held)
        started = time.perf_counter()
        self.ledger.rec.queue_ms += (started - queued) * 1000
        committed = False
        try:
            budget = self.deadline - self.loop.time()
            if self.stream:
                chunks = adapter.stream(call)
                first = await first_chunk(chunks, within=min(entry.first_token_timeout, budget))

                def release() -> None:
                    held.gate.release()
                    held.release()

                def closed(stream: OwnedStream) -> None:
                    self._stream_closed(stream, held, entry, started)

                stream = OwnedStream(first, chunks, release, self.deadline, closed)
                committed = True
                latency = _ms(started)
                return Answer(entry.provider, entry.model, latency, [], stream=stream, entry=entry)
            with within(min(entry.timeout, budget)):
                result = await adapter.complete(call)
            latency = _ms(started)
            return Answer(
                entry.provider, entry.model, latency, [], result.body, result.usage, entry=entry
            )
        finally:
            if not committed:
                held.gate.release()
                held.release()

    async def _wait_for_slot(self, held: Held) -> None:
        try:
            try:
                async with asyncio.timeout_at(self.deadline):
                    await held.gate.acquire()
            except TimeoutError:
                raise UpstreamError(
                    Reason.DEADLINE, "the request deadline ran out waiting for a slot"
                ) from None
        except BaseException:
            held.release()
            raise

    def _stream_closed(self, stream: OwnedStream, held: Held, entry: Entry, started: float) -> None:
        """A stream ended: the health verdict on its entry, and (if served) the bookkeeping.

        Ended well: a success with the whole duration. Failed mid-way: a `stream_error`
        against the deployment. Closed early (the client left, the deadline, a hedge lost):
        no verdict, only the half-open probe slot it may hold is freed.
        """
        error = stream.error
        if error is not None and error.reason is not Reason.DEADLINE:
            failure = UpstreamError(Reason.STREAM_ERROR, self.engine.redact(error.message))
            held.health.failure(entry.model, failure)
            self._states(held, entry, str(failure.reason))
        elif stream.outcome == "ok":
            held.health.success(entry.model, _ms(started))
            self._states(held, entry)
        else:
            held.health.abandon(entry.model)
        answer = self.committed
        if answer is None or answer.stream is not stream:
            return  # a hedge's loser, closed before anything was served from it
        stream.cost_usd = self.ledger.settle(
            self.attempts, outcome=stream.outcome, usage=stream.usage, entry=entry,
            error=f"{error.reason}: {error.message}"[:300] if error else "",
        )  # fmt: skip

    def _states(self, held: Held, entry: Entry, why: str = "") -> None:
        """Log a breaker that opened or closed (once per change, not per request)."""
        states = self.engine.states
        host, deployment = held.health.host, held.health.deployment(entry.model)
        if states.all_up and not host.open_until and not deployment.open_until:
            return  # nothing down, nothing opened: the common case, nothing to log
        states.observe(entry.provider, host.state, why)
        states.observe(entry.deployment, deployment.state, why)

    def _redacted(self, error: UpstreamError) -> UpstreamError:
        redact = self.engine.redact
        error.message = redact(error.message)
        error.param = redact(error.param) if error.param else error.param
        error.code = redact(error.code) if error.code else error.code
        return error

    def _failed(self, entry: Entry, error: UpstreamError, latency: float) -> None:
        if error.reason is Reason.RATE_LIMITED and error.retry_after is not None:
            wait = error.retry_after
            self.retry_after = wait if self.retry_after is None else min(self.retry_after, wait)
        self.attempts.append(
            Attempt(entry.provider, entry.model, error.reason, error.status, latency, error.message)
        )
        log.info(
            "attempt failed: provider=%s model=%s reason=%s status=%s latency_ms=%.1f %s",
            entry.provider, entry.model, error.reason, error.status, latency, error.message,
            extra={"request_id": self.info.request_id},
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
                answers = []
                for task in done:
                    del running[task]
                    answer = task.result()
                    if answer is not None:
                        answers.append(answer)
                if answers:  # two may finish in the same loop turn: serve one, close the other
                    for extra in answers[1:]:
                        self.attempts.append(
                            Attempt(extra.provider, extra.model, Reason.HEDGE_LOST)
                        )
                        if extra.stream is not None:
                            await close_stream(extra.stream)
                    return answers[0]
                if not running:
                    launch()
            return None
        finally:
            for task, entry in running.items():
                task.cancel()
                self.attempts.append(Attempt(entry.provider, entry.model, Reason.HEDGE_LOST))
            for result in await asyncio.gather(*running, return_exceptions=True):
                if isinstance(result, Answer) and result.stream is not None:
                    await close_stream(result.stream)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
