"""The chain engine: try an alias's entries in order until one answers.

Non-stream: an entry has answered when its whole body is in. Stream: when its first
chunk is in (`_open`, TensorZero's peek_first_chunk): until then a failure moves on,
after it the answer is committed to that entry. Every failed entry is kept, in order,
as an `Attempt`; when all fail, `AllProvidersFailed` carries them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .config import Config, Entry
from .errors import AllProvidersFailed, Attempt, ModelNotFound, UpstreamError, UpstreamRejected
from .limits import Gate
from .policy import falls_back, map_exception
from .providers import Call, Completion, Provider, build
from .wire import ChatRequest, Usage

log = logging.getLogger("omnimind.chain")


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


class Engine:
    """Holds the providers of one config; shared by the HTTP app and the Python API."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {}
        self.gates: dict[str, Gate] = {}
        for name, pc in config.providers.items():
            if pc.unavailable is None:
                self.providers[name] = build(pc)
            self.gates[name] = Gate(pc.spec.max_concurrency, pc.spec.max_queue)

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.server.request_timeout
        attempts: list[Attempt] = []
        retry_after: float | None = None
        for entry in entries:
            name = entry.provider
            provider = self.providers.get(name)
            if provider is None:
                why = self.config.providers[name].unavailable or "unavailable"
                attempts.append(Attempt(name, entry.model, "unavailable", message=why))
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                attempts.append(Attempt(name, entry.model, "deadline"))
                break
            call = Call(request, entry, request_id)
            started = time.perf_counter()
            try:
                if stream:
                    chunks = await self._open(
                        provider, call, min(entry.first_token_timeout, remaining), deadline
                    )
                    body, usage = b"", None
                else:
                    result = await self._complete(provider, call, min(entry.timeout, remaining))
                    chunks, body, usage = None, result.body, result.usage
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                error = map_exception(exc)
                latency = (time.perf_counter() - started) * 1000
                if not falls_back(error):
                    raise UpstreamRejected(
                        error.status or 400, error.message, param=error.param, code=error.code
                    ) from None
                if error.reason == "rate_limited" and error.retry_after is not None:
                    retry_after = min(retry_after or error.retry_after, error.retry_after)
                attempts.append(
                    Attempt(name, entry.model, error.reason, error.status, latency, error.message)
                )
                log.warning(
                    "attempt failed: provider=%s model=%s reason=%s status=%s latency_ms=%.1f %s",
                    name,
                    entry.model,
                    error.reason,
                    error.status,
                    latency,
                    error.message,
                    extra={"request_id": request_id},
                )
                continue
            latency = (time.perf_counter() - started) * 1000
            return Answer(name, entry.model, latency, attempts, body, usage, chunks)
        raise AllProvidersFailed(request.model, attempts, retry_after)

    async def _complete(self, provider: Provider, call: Call, budget: float) -> Completion:
        gate = self.gates[provider.name]
        async with asyncio.timeout(budget):
            await gate.acquire()
            try:
                return await provider.complete(call)
            finally:
                gate.release()

    async def _open(
        self, provider: Provider, call: Call, first_token_timeout: float, deadline: float
    ) -> AsyncIterator[bytes]:
        gate = self.gates[provider.name]
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
            raise UpstreamError("bad_response", "stream ended before its first chunk") from None
        except BaseException:
            await _close(chunks)
            raise
        return _relay(first, chunks, gate, deadline)

    async def aclose(self) -> None:
        await asyncio.gather(*(p.aclose() for p in self.providers.values()), return_exceptions=True)


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
