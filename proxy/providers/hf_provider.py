"""The local `transformers` adapter (loaded only when a config asks for one; see huggingface.py).

Weights. `entry.model` is a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"; HF_TOKEN or
HUGGING_FACE_HUB_TOKEN is passed for gated models), a local directory (absolute, relative
or `~`), or `package:<python_pkg>`: the folder of an installed Python package that holds
the files. `entry.gguf_file` names a GGUF file in that folder (transformers dequantizes it).

Loading. Models are cached per (model, gguf_file). The first call for a model starts one
loader thread whose result is a `concurrent.futures.Future`; every caller, concurrent or
later, awaits that same future (`asyncio.wrap_future`), so a model loads exactly once and
the event loop never blocks. The future is loop-agnostic, which lets `preload()` start a
load before any event loop runs. A failed load is remembered: calls within
`RETRY_LOAD_AFTER` seconds fail fast with the same `unavailable` error, the next one
after that tries again.

Generation. Each request runs `model.generate` on its own short-lived thread. A streamer
(`TextFeed`) decodes the generated ids into text deltas, holds back an incomplete UTF-8
sequence (a trailing U+FFFD) and any tail that could be the start of a stop string, cuts
the text at the first stop string, and hands each delta to the event loop with
`call_soon_threadsafe`. The first chunk of a stream is sent only when the first token (or
the end) is in, so a load or prompt failure still falls back to the next chain entry.

Cancellation. `stream()` and `complete()` set a `threading.Event` in `finally`; a
`StoppingCriteria` checks it before every token, so a closed stream, a timeout or a
disconnected client stops the worker thread within one decoding step. A stop string sets
the same event (the one token decoded after it is dropped). `aclose()` stops
and joins the workers. A loader thread cannot be interrupted: it finishes its load.

Requests. A request wrong everywhere (unknown role, no messages, temperature or top_p out
of range, invalid JSON types) is a `client_error` (400, no fallback). A valid request this
adapter cannot serve (`n` > 1, messages the chat template refuses) is `unavailable`, so
the chain moves on. `tools` and `response_format` are not acted on.

Concurrency. The engine's gate (`max_concurrency`, default 1) limits calls; besides, a
model runs one `generate()` at a time (a lock per model), and sampling requests hold one
process-wide lock so that `seed` (torch's global generator) reproduces the same answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import torch

from ..config import Entry, ProviderConfig
from ..errors import UpstreamError
from ..wire import (
    ChatCompletion,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    OutMessage,
    Usage,
    completion_id,
    encode,
    now,
)
from .base import Call, Completion
from .hf_batch import generate_batched
from .hf_generate import Generation, parse_params
from .hf_weights import LoadedModel, LoadError, ModelKey, describe, load_model, log
from .huggingface import Spec as HuggingFaceSpec

RETRY_LOAD_AFTER = 60.0  # seconds a failed load answers `unavailable` before it is tried again
LOAD_THREAD = "omnimind-hf-load"

# ---- the provider ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    """One model's load: done or under way; a failure is kept until `RETRY_LOAD_AFTER`."""

    future: concurrent.futures.Future[LoadedModel]
    failed_at: float | None = None

    def stale(self) -> bool:
        return self.failed_at is not None and time.monotonic() - self.failed_at > RETRY_LOAD_AFTER


class HuggingFaceProvider:
    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, HuggingFaceSpec)
        self.name = config.name
        self._spec = spec
        self._token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        self._slots: dict[ModelKey, _Slot] = {}
        self._slots_lock = threading.Lock()
        self._running: set[Generation] = set()
        self._run = functools.partial(
            generate_batched, max_batch=spec.max_batch, wait=spec.batch_wait_ms / 1000
        )
        self._closed = False

    # -- loading

    def preload(self, entries: Iterable[Entry]) -> None:
        """Start loading every model these entries name (background threads; returns at once).

        Safe without an event loop, so the engine can call it while it builds providers.
        """
        for entry in entries:
            if entry.provider == self.name:
                self._slot(ModelKey(entry.model, entry.gguf_file))

    def ready(self) -> bool:
        """Every model asked for so far is loaded (a failed load is not ready)."""
        with self._slots_lock:
            futures = [slot.future for slot in self._slots.values()]
        return all(f.done() and f.exception() is None for f in futures)

    async def load(self, entry: Entry) -> LoadedModel:
        """The entry's model, loaded on first use (once, however many callers wait for it)."""
        future = self._slot(ModelKey(entry.model, entry.gguf_file)).future
        try:
            return await asyncio.wrap_future(future)
        except LoadError as exc:
            raise UpstreamError("unavailable", str(exc)) from None

    def _slot(self, key: ModelKey) -> _Slot:
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None or slot.stale():
                future: concurrent.futures.Future[LoadedModel] = concurrent.futures.Future()
                # Running: an awaiting task that is cancelled must not cancel the load for all.
                future.set_running_or_notify_cancel()
                slot = self._slots[key] = _Slot(future)
                thread = threading.Thread(
                    target=self._load_into, args=(key, slot), name=LOAD_THREAD, daemon=True
                )
                thread.start()
            return slot

    def _load_into(self, key: ModelKey, slot: _Slot) -> None:
        started = time.perf_counter()
        try:
            loaded = load_model(key, self._spec.device, self._spec.dtype, self._token)
        except Exception as exc:  # noqa: BLE001 - any failure makes the model unavailable
            message = f"cannot load model {key}: {describe(exc)}"
            log.error("%s (after %.1f s)", message, time.perf_counter() - started)
            slot.failed_at = time.monotonic()
            slot.future.set_exception(LoadError(message))
            return
        slot.future.set_result(loaded)
        if self._closed:  # closed while loading: let it go
            self._forget()

    # -- serving

    async def _begin(self, call: Call) -> Generation:
        if self._closed:
            raise UpstreamError("unavailable", "provider is closed")
        params = parse_params(call, self._spec.max_new_tokens)
        loaded = await self.load(call.entry)
        generation = Generation(loaded, params, self._running.discard, self._run)
        self._running.add(generation)
        generation.start()
        return generation

    async def complete(self, call: Call) -> Completion:
        generation = await self._begin(call)
        parts: list[str] = []
        try:
            event = await generation.next()
            while isinstance(event, str):
                parts.append(event)
                event = await generation.next()
        finally:
            generation.stop()
        usage = event.usage()
        message = OutMessage(content="".join(parts))
        body = ChatCompletion(
            id=completion_id(),
            created=now(),
            model=call.entry.model,
            choices=[Choice(index=0, message=message, finish_reason=event.finish_reason)],
            usage=usage,
            system_fingerprint=generation.loaded.fingerprint,
        )
        return Completion(encode(body), usage)

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        generation = await self._begin(call)
        try:
            # The first token (or the end) is in: only now is the answer committed.
            event = await generation.next()
            chunk = _Chunks(completion_id(), now(), call.entry.model)
            yield chunk.delta(Delta(role="assistant", content=""))
            while isinstance(event, str):
                yield chunk.delta(Delta(content=event))
                event = await generation.next()
            yield chunk.delta(Delta(), event.finish_reason)
            if call.request.include_usage:
                yield chunk.usage(event.usage())
        finally:
            generation.stop()

    async def aclose(self) -> None:
        """Stop generations, wait for their threads, drop the models."""
        self._closed = True
        running = list(self._running)
        for generation in running:
            generation.stop()
        if running:
            await asyncio.to_thread(_join, [g.thread for g in running], 10.0)
        self._forget()

    def _forget(self) -> None:
        with self._slots_lock:
            self._slots.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


# ---- answer payloads ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chunks:
    """The `chat.completion.chunk` payloads of one streamed answer."""

    id: str
    created: int
    model: str

    def delta(self, delta: Delta, finish_reason: str | None = None) -> bytes:
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return encode(Chunk(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def usage(self, usage: Usage) -> bytes:
        chunk = Chunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)
        return encode(chunk)
