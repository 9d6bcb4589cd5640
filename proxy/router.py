"""The Python API (issue 8): the seed's in-process router, served by the gateway's own Engine.

    from proxy import get_llm_router, LLMModelTier, invoke_llm_sync

    router = get_llm_router()  # process-wide; reads the server's models.yaml
    resp = await router.invoke("What is 2+2?", tier=LLMModelTier.BALANCED)
    resp.success, resp.text, resp.provider, resp.latency_ms, resp.tokens_used
    invoke_llm_sync("Hello", tier=LLMModelTier.FAST)  # the same, from sync code

A tier is an alias of models.yaml (`omnimind-fast`, `omnimind-balanced`, `omnimind-hq`, or
any other alias given as a string); its chain and fallback are the `Engine`'s, exactly as
the HTTP server runs them. This module only builds requests and reads answers.

One loop per router. Upstream pools belong to the event loop that made them, so a
router owns a daemon thread running one event loop, and its Engine lives there.
`await router.invoke(...)` from any loop hops onto that loop and back; `invoke_sync` and
`invoke_llm_sync` block on it, so they work from plain code, from worker threads, and even
from inside another running loop (blocking that loop meanwhile). Only the router's own
loop thread may not block on itself: that raises RuntimeError.

Failures. `invoke` never raises for a provider fault: when every entry fails it returns
`LLMResponse(success=False, error=...)` naming each attempt in order. A stream cannot say
so in a return value: `stream` raises `LLMError` (carrying the same `LLMResponse`) when no
provider could start, or when the committed provider fails mid-way. Invalid arguments (an
unknown tier or provider, a reserved parameter) raise ValueError before anything is sent.

Counters (`get_metrics`) are the seed's: requests_total, requests_success, fallback_used
and latency_by_provider. They are kept per router, by its engine's own `Observer`, from
each request's answer and attempts: the same code that serves the server's `/v1/stats`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from .config import Config, default_path, load
from .engine import Engine, Info
from .errors import GatewayError
from .gateway import Gateway
from .policy import map_exception
from .providers import Op
from .seed import (
    LLMError,
    LLMModelTier,
    LLMProvider,
    LLMResponse,
    answered,
    build_request,
    delta_text,
    failed,
    tier_alias,
)
from .streaming import close_stream
from .wire import ChatRequest

T = TypeVar("T")

_CLOSE_TIMEOUT = 10.0


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None


async def _call_on_loop(fn: Callable[[], T]) -> T:
    return fn()


class LLMRouter:
    """The seed's router on the gateway's Engine, run on a loop of its own (see module doc).

    `config`: a loaded `Config`, a models.yaml path, or None for `default_path()`.
    Close it with `close()` / `await aclose()` (also done at interpreter exit).
    """

    def __init__(
        self, config: Config | str | os.PathLike[str] | None = None, *, watch: bool = True
    ) -> None:
        if not isinstance(config, Config):
            config = load(config if config is not None else default_path())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="omnimind-router", daemon=True
        )
        self._thread.start()
        # Made on the loop, so the engine and its sessions live there.
        gateway: list[Gateway] = []
        self._closer = weakref.finalize(self, _shutdown, self._loop, self._thread, gateway)
        try:
            gateway.append(self._call(_start(config, watch)))
        except BaseException:
            self._closer()
            raise
        self._gateway = gateway[0]

    @property
    def config(self) -> Config:
        """The config now in use (a reload replaces it)."""
        return self._gateway.config

    @property
    def _engine(self) -> Engine:
        return self._gateway.engine

    def reload(self) -> bool:
        """Read models.yaml again and swap it in, as the server does on SIGHUP.

        Providers whose config did not change keep their pools, breakers and queues;
        requests in flight finish on the old config. False, with one log line, if the file
        is invalid: the old config keeps serving. With `watch` (the default) this happens
        by itself within about a second of the file changing.
        """
        return self._call(self._gateway.reload())

    async def areload(self) -> bool:
        """`reload()` without blocking the calling loop."""
        return await self._hop(self._gateway.reload())

    @property
    def closed(self) -> bool:
        return not self._closer.alive

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The router's own event loop (on its daemon thread), where its Engine runs."""
        return self._loop

    # -- requests ---------------------------------------------------------------------------

    async def invoke(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        tier: LLMModelTier | str = LLMModelTier.BALANCED,
        preferred_provider: LLMProvider | str | None = None,
        **params: Any,
    ) -> LLMResponse:
        """Answer `prompt` (a user message, or a list of chat messages) from `tier`'s chain.

        `params` (temperature, max_tokens, tools, response_format, ...) go into the request
        body as given. Provider faults come back as `success=False`, never as exceptions.
        """
        request, alias, prefer = build_request(
            self.config, prompt, tier, preferred_provider, params, False
        )
        return await self._hop(self._complete(request, alias, prefer))

    def invoke_sync(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        tier: LLMModelTier | str = LLMModelTier.BALANCED,
        preferred_provider: LLMProvider | str | None = None,
        **params: Any,
    ) -> LLMResponse:
        """`invoke`, blocking: from sync code, worker threads or inside another loop."""
        request, alias, prefer = build_request(
            self.config, prompt, tier, preferred_provider, params, False
        )
        return self._call(self._complete(request, alias, prefer))

    def stream(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        tier: LLMModelTier | str = LLMModelTier.BALANCED,
        preferred_provider: LLMProvider | str | None = None,
        **params: Any,
    ) -> AsyncGenerator[str, None]:
        """The answer's text deltas, as they come: `async for delta in router.stream(...)`.

        Raises `LLMError` if no provider can start the stream (with every attempt), or if the
        provider that started it fails mid-way (`.response.text` holds what came before).
        Closing the generator early (`contextlib.aclosing`, or when it is collected after a
        `break`) closes the upstream stream.
        """
        request, alias, prefer = build_request(
            self.config, prompt, tier, preferred_provider, params, True
        )
        return self._deltas(request, alias, prefer)

    async def _complete(self, request: ChatRequest, alias: str, prefer: str | None) -> LLMResponse:
        started = time.perf_counter()
        try:
            answer = await self._engine.complete(request, Op.CHAT, Info(_request_id(), prefer))
        except GatewayError as exc:
            return failed(exc, alias, started)
        return answered(answer)

    async def _deltas(
        self, request: ChatRequest, alias: str, prefer: str | None
    ) -> AsyncGenerator[str, None]:
        started = time.perf_counter()
        try:
            info = Info(_request_id(), prefer)
            answer = await self._hop(self._engine.stream(request, Op.CHAT, info))
        except GatewayError as exc:
            raise LLMError(failed(exc, alias, started)) from None
        chunks = answer.stream
        assert chunks is not None
        text: list[str] = []
        finished = False
        try:
            while (chunk := await self._hop(_next(chunks))) is not None:
                delta = delta_text(chunk)
                if delta:
                    text.append(delta)
                    yield delta
            finished = True
        except Exception as exc:  # noqa: BLE001 - committed: report the provider's fault
            if self.closed:
                raise
            error = map_exception(exc)
            raise LLMError(
                LLMResponse(
                    False, "".join(text), answer.provider, answer.model, round(answer.latency_ms),
                    error=f"The stream from {answer.provider} ({answer.model}) failed after it "
                    f"started: {error}",
                    attempts=answer.attempts,
                )
            ) from None  # fmt: skip
        finally:
            if not finished and not self.closed:
                await self._hop(close_stream(chunks))

    def alias(self, tier: LLMModelTier | str) -> str:
        """The models.yaml alias for a tier (a `LLMModelTier`, its name, or an alias)."""
        return tier_alias(self.config, tier)

    # -- state ------------------------------------------------------------------------------

    def get_provider_status(self) -> dict[str, bool]:
        """Each provider's availability now, e.g. {'ollama': True, 'openrouter': False}.

        Available: its adapter loaded, its breaker not open, not cooling down after a 429.
        """

        def status() -> dict[str, bool]:
            return {p.id: p.available for p in self._engine.provider_status()}

        return self._read(status)

    def get_metrics(self) -> dict[str, Any]:
        """The seed's counters for this router: requests_total, requests_success,
        fallback_used, latency_by_provider (mean ms of the answering attempt, per provider)."""
        return self._read(self._engine.observer.stats.snapshot)

    # -- the loop ---------------------------------------------------------------------------

    def _read(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the router's loop (where the state it reads changes), without blocking it."""
        if threading.current_thread() is self._thread:
            return fn()
        return self._call(_call_on_loop(fn))

    async def _hop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` on the router's loop, from whichever loop awaits this."""
        if asyncio.get_running_loop() is self._loop:
            return await coro
        future = self._submit(coro)
        return await asyncio.wrap_future(future)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the router's loop and block this thread until it is done."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "A blocking LLMRouter call was made on the router's own event loop thread, "
                "which would deadlock; use `await router.invoke(...)` there"
            )
        future = self._submit(coro)
        try:
            return future.result()
        finally:
            future.cancel()  # interrupted (e.g. KeyboardInterrupt): stop the work too

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self.closed:
            coro.close()
            raise RuntimeError("This LLMRouter is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Cancel what is in flight, close the providers and stop the loop (idempotent)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("An LLMRouter cannot be closed from its own event loop thread")
        self._closer()

    async def aclose(self) -> None:
        """`close()` without blocking the calling loop."""
        if asyncio.get_running_loop() is self._loop:
            raise RuntimeError("An LLMRouter cannot be closed from its own event loop")
        await asyncio.to_thread(self._closer)

    def __enter__(self) -> LLMRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LLMRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _request_id() -> str:
    return f"py-{uuid.uuid4().hex}"


async def _start(config: Config, watch: bool) -> Gateway:
    gateway = Gateway(config, audit=False)
    if watch:
        await gateway.start(freeze=False)  # the file watcher; SIGHUP is the server's
    return gateway


async def _wind_down(gateway: list[Gateway]) -> None:
    """On the router's loop: cancel its requests, close open streams, close providers."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
    if gateway:
        await gateway[0].aclose()


def _shutdown(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, gateway: list[Gateway]
) -> None:
    """The router's finalizer: runs once, from close() or at interpreter exit."""
    try:
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(_wind_down(gateway), loop).result(_CLOSE_TIMEOUT)
    except (concurrent.futures.TimeoutError, RuntimeError):
        pass  # stopping the loop below is all that is left to do
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(_CLOSE_TIMEOUT)
        if not thread.is_alive():
            loop.close()


# ---- the process-wide router -------------------------------------------------------------

_routers: dict[str, LLMRouter] = {}
_routers_lock = threading.Lock()


def get_llm_router(config_path: str | os.PathLike[str] | None = None) -> LLMRouter:
    """The process-wide router for a models.yaml, made on first use (like `functools.cache`).

    Keyed by the file's absolute path; None means `default_path()` ($OMNIMIND_CONFIG, else
    ./models.yaml), the file the server reads. Every caller and thread gets the same router
    (one engine, one set of connection pools and breakers). A router that was closed is
    replaced by a fresh one on the next call. Edits to the file are picked up as the server
    picks them up (a file watcher; or call `reload()`).
    """
    path = os.path.abspath(os.fspath(config_path if config_path is not None else default_path()))
    with _routers_lock:
        router = _routers.get(path)
        if router is None or router.closed:
            router = _routers[path] = LLMRouter(path)
        return router


def invoke_llm_sync(
    prompt: str | Sequence[Mapping[str, Any]],
    tier: LLMModelTier | str = LLMModelTier.BALANCED,
    preferred_provider: LLMProvider | str | None = None,
    **params: Any,
) -> LLMResponse:
    """The seed's one-call helper: `get_llm_router().invoke_sync(...)`."""
    return get_llm_router().invoke_sync(prompt, tier, preferred_provider, **params)
