"""The local `transformers` adapter (loaded only when a config asks for one; see huggingface.py).

Loading. Models are cached per (model, gguf_file). The first call for a model starts one
loader thread whose result is a `concurrent.futures.Future`; every caller, concurrent or
later, awaits that same future, so a model loads exactly once and the event loop never
blocks. `preload()` starts a load before any event loop runs. A failed load is
remembered: calls within `RETRY_LOAD_AFTER` seconds fail fast with the same
`unavailable` error, the next one after that tries again. Weights come from
`hf_weights` (and its converted-weights cache, `hf_cache`).

Generation. Each loaded model has one worker thread (`hf_worker`) that decodes every
request for it, batched continuously up to `max_batch` rows. A request is validated and
its prompt templated here, before it is queued; its text comes back through a
`Generation`. A legacy completion (`/v1/completions`) is its raw prompt's tokens, no
template, answered as a `text_completion`. The first chunk of a stream is sent only when
the first token (or the end) is in, so a load or prompt failure still falls back to the
next chain entry.

Structured output. `response_format` (`json_object`, `json_schema`) and a forced tool
call (`tool_choice` naming a function, or `"required"`) constrain decoding with a grammar
(`hf_grammar`): the answer is JSON that matches the schema; a forced tool call comes back
as `tool_calls` with `finish_reason: "tool_calls"`. A schema the grammar library cannot
compile is the client's error (400). With `tool_choice: "auto"` the answer is plain text.

Cancellation. `stream()` and `complete()` set the request's halt event in `finally`; the
worker drops a halted row before its next step, so a closed stream, a timeout or a
disconnected client frees its row within one decoding step. `aclose()` stops the workers.

Requests. A request wrong everywhere (unknown role, no messages, temperature or top_p out
of range, invalid JSON types) is a `client_error` (400, no fallback). A valid request this
adapter cannot serve (`n` > 1, messages the chat template refuses) is `unsupported`, so
the chain moves on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..completions import TextAnswer, finish_reason
from ..config import Entry, ProviderConfig
from ..errors import UpstreamError
from ..wire import (
    ChatCompletion,
    Choice,
    Chunk,
    ChunkChoice,
    Delta,
    DeltaToolCall,
    OutFunction,
    OutMessage,
    OutToolCall,
    Usage,
    completion_id,
    encode,
    now,
)
from . import hf_compile
from .base import Call, Completion, Op
from .hf_generate import (
    Done,
    Generation,
    Params,
    TextFeed,
    parse_params,
    prompt_ids,
    raw_ids,
    raw_params,
    schema_error,
)
from .hf_grammar import GrammarError, Grammars, tool_call_from_text
from .hf_weights import LoadedModel, LoadError, ModelKey, describe, load_model, log
from .hf_worker import Job, Sampling, Worker
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
    ops = frozenset({Op.CHAT, Op.COMPLETION})  # chat, and legacy completions on raw prompts

    def __init__(self, config: ProviderConfig) -> None:
        spec = config.spec
        assert isinstance(spec, HuggingFaceSpec)
        self.name = config.name
        self._spec = spec
        self._token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        self._slots: dict[ModelKey, _Slot] = {}
        self._slots_lock = threading.Lock()
        self._closed = False
        self.loads = 0  # models loaded (a counter for tests and /v1/providers)

    # -- loading

    def preload(self, entries: Iterable[Entry]) -> None:
        """Start loading every model these entries name (background threads; returns at once).

        Safe without an event loop, so the engine can call it while it builds providers.
        """
        for entry in entries:
            if entry.provider == self.name:
                self._slot(ModelKey(entry.model, entry.gguf_file))

    def settle(self, timeout: float = 600.0) -> None:
        """Wait (blocking) until every load under way has ended, loaded or failed."""
        with self._slots_lock:
            futures = [slot.future for slot in self._slots.values()]
        concurrent.futures.wait(futures, timeout)

    def busy(self) -> bool:
        """Some row is decoding or queued on one of this provider's models."""
        with self._slots_lock:
            futures = [slot.future for slot in self._slots.values()]
        workers = [f.result().worker for f in futures if f.done() and f.exception() is None]
        return any(w.stats.in_flight for w in workers)

    def ready(self) -> bool:
        """Every model asked for so far is loaded (a failed load is not ready)."""
        with self._slots_lock:
            futures = [slot.future for slot in self._slots.values()]
        return all(f.done() and f.exception() is None for f in futures)

    def stats(self) -> dict[str, Any]:
        """Per loaded model: how it was loaded and what its worker has done."""
        with self._slots_lock:
            slots = list(self._slots.items())
        out: dict[str, Any] = {}
        for key, slot in slots:
            if slot.future.done() and slot.future.exception() is None:
                loaded = slot.future.result()
                out[str(key)] = {
                    "engine": loaded.fingerprint,
                    "from_cache": loaded.from_cache,
                    "load_seconds": round(loaded.load_seconds, 3),
                    "compile": getattr(loaded.runner, "compile_status", "off"),
                    "int8_kernel": getattr(loaded.runner, "kernel", None),  # hf_int8's
                    **asdict(loaded.worker.stats),
                }
        return {"loads": self.loads, "models": out}

    async def load(self, entry: Entry) -> LoadedModel:
        """The entry's model, loaded on first use (once, however many callers wait for it)."""
        future = self._slot(ModelKey(entry.model, entry.gguf_file)).future
        if future.done() and future.exception() is None:
            return future.result()  # loaded: no round trip through the loop's wake-up pipe
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
                # Not a daemon: a process that exits mid-load waits for it. A daemon thread
                # stopped inside torch or safetensors aborts the process (std::terminate).
                thread = threading.Thread(
                    target=self._load_into, args=(key, slot), name=LOAD_THREAD
                )
                thread.start()
            return slot

    def _load_into(self, key: ModelKey, slot: _Slot) -> None:
        started = time.perf_counter()
        spec = self._spec
        try:
            loaded = load_model(
                key, spec.device, spec.dtype, self._token, spec.quantize, spec.max_batch
            )
            sampling = Sampling(frozenset(loaded.eos_ids), loaded.top_k)
            loaded.worker = Worker(loaded.runner, sampling)
        except Exception as exc:  # noqa: BLE001 - any failure makes the model unavailable
            message = f"cannot load model {key}: {describe(exc)}"
            log.error("%s (after %.1f s)", message, time.perf_counter() - started)
            slot.failed_at = time.monotonic()
            slot.future.set_exception(LoadError(message))
            return
        self.loads += 1
        # Before the future is set: kept compiled packages are in for the first request.
        worker = loaded.worker
        recipe = hf_compile.Recipe(
            key.model, key.gguf_file, spec.dtype, spec.quantize, spec.max_batch
        )
        hf_compile.start(
            loaded.runner, recipe, spec.compile_mode, lambda: worker.stats.in_flight > 0,
            lambda: self._closed,
        )  # fmt: skip
        slot.future.set_result(loaded)
        if self._closed:  # closed while loading: let it go
            self._forget()

    # -- serving

    async def _begin(self, call: Call) -> tuple[Generation, LoadedModel, Params]:
        if self._closed:
            raise UpstreamError("unavailable", "provider is closed")
        if call.op is Op.COMPLETION:
            params = raw_params(call)
        else:
            params = parse_params(call, self._spec.max_new_tokens)
        loaded = await self.load(call.entry)
        prompt, matcher = await asyncio.to_thread(_prepare, loaded, params)
        generation = Generation()
        feed = TextFeed(loaded.tokenizer, params.stops, generation.halt, generation.emit)
        loaded.worker.submit(Job(prompt, params, feed, generation.finish, matcher))
        return generation, loaded, params

    async def complete(self, call: Call) -> Completion:
        generation, loaded, params = await self._begin(call)
        parts: list[str] = []
        try:
            event = await generation.next()
            while isinstance(event, str):
                parts.append(event)
                event = await generation.next()
        finally:
            generation.stop()
        text = "".join(parts)
        if params.raw is not None:  # a legacy completion
            answer = TextAnswer.new(call.entry.model, loaded.fingerprint)
            text = _echo(loaded, params) + text
            raw = answer.body(text, finish_reason(event.finish_reason), event.usage())
            return Completion(raw, event.usage())
        message, finish = _message(params, text, event)
        body = ChatCompletion(
            id=completion_id(),
            created=now(),
            model=call.entry.model,
            choices=[Choice(index=0, message=message, finish_reason=finish)],
            usage=event.usage(),
            system_fingerprint=loaded.fingerprint,
        )
        return Completion(encode(body), event.usage())

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        generation, loaded, params = await self._begin(call)
        if params.raw is not None:  # a legacy completion
            try:
                async for piece in _text_stream(generation, loaded, params, call):
                    yield piece
            finally:
                generation.stop()
            return
        tool_call = params.rule is not None and params.rule.kind == "tool_call"
        try:
            # The first token (or the end) is in: only now is the answer committed.
            event = await generation.next()
            chunk = _Chunks(completion_id(), now(), call.entry.model)
            yield chunk.delta(Delta(role="assistant", content=None if tool_call else ""))
            parts: list[str] = []
            while isinstance(event, str):
                if tool_call:
                    parts.append(event)
                else:
                    yield chunk.delta(Delta(content=event))
                event = await generation.next()
            message, finish = _message(params, "".join(parts), event)
            if message.tool_calls:
                yield chunk.delta(Delta(tool_calls=[_indexed(t) for t in message.tool_calls]))
            elif message.content:  # a tool call cut short comes back as text, as non-stream
                yield chunk.delta(Delta(content=message.content))
            yield chunk.delta(Delta(), finish)
            if call.request.include_usage:
                yield chunk.usage(event.usage())
        finally:
            generation.stop()

    async def aclose(self) -> None:
        """Stop the workers (and the rows they decode), drop the models."""
        self._closed = True
        await asyncio.to_thread(self._forget)

    def _forget(self) -> None:
        with self._slots_lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            if slot.future.done() and slot.future.exception() is None:
                slot.future.result().worker.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _prepare(loaded: LoadedModel, params: Params) -> tuple[list[int], Any]:
    """The prompt's ids and, for constrained output, a fresh grammar matcher."""
    if params.raw is not None:
        return raw_ids(loaded.tokenizer, params.raw, loaded.runner.vocab), None
    prompt = prompt_ids(loaded.tokenizer, params.messages)
    if params.rule is None:
        return prompt, None
    with loaded.grammars_lock:
        if loaded.grammars is None:
            loaded.grammars = Grammars(loaded.tokenizer, loaded.runner.vocab, loaded.eos_ids)
    try:
        return prompt, loaded.grammars.matcher(params.rule)
    except GrammarError as exc:
        raise schema_error(exc) from None


async def _text_stream(
    generation: Generation, loaded: LoadedModel, params: Params, call: Call
) -> AsyncGenerator[bytes, None]:
    """A legacy completion's `text_completion` chunks (the echoed prompt first); the
    caller stops the generation, as it does for chat."""
    event = await generation.next()  # the first token (or the end): committed from here
    answer = TextAnswer.new(call.entry.model, loaded.fingerprint)
    if params.echo:
        yield answer.chunk(_echo(loaded, params))
    while isinstance(event, str):
        yield answer.chunk(event)
        event = await generation.next()
    yield answer.chunk("", finish_reason(event.finish_reason))
    if call.request.include_usage:
        yield answer.usage_chunk(event.usage())


def _echo(loaded: LoadedModel, params: Params) -> str:
    if not params.echo or params.raw is None:
        return ""
    raw = params.raw
    return raw if isinstance(raw, str) else loaded.tokenizer.decode(raw)


def _message(params: Params, text: str, done: Done) -> tuple[OutMessage, str]:
    """The answer's message and finish reason: text, or the forced tool call it encodes."""
    rule = params.rule
    if rule is None or rule.kind != "tool_call" or done.finish_reason != "stop":
        return OutMessage(content=text), done.finish_reason
    try:
        name, arguments = tool_call_from_text(rule, text)
    except ValueError:  # cut by one of the request's own stop strings: the text as it is
        return OutMessage(content=text), done.finish_reason
    call = OutToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", function=OutFunction(name=name, arguments=arguments)
    )
    return OutMessage(content=None, tool_calls=[call]), "tool_calls"


def _indexed(call: OutToolCall) -> DeltaToolCall:
    function = {"name": call.function.name, "arguments": call.function.arguments}
    return DeltaToolCall(index=0, id=call.id, type="function", function=function)


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
