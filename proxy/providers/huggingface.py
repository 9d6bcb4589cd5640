"""Local inference with `transformers`: a chain entry's `model` names the weights.

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
import contextlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ..config import Entry, HuggingFaceSpec, ProviderConfig
from ..errors import InvalidRequest, UpstreamError
from ..policy import CLIENT_ERROR
from ..wire import (
    ChatBody,
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

log = logging.getLogger("omnimind.huggingface")

RETRY_LOAD_AFTER = 60.0  # seconds a failed load answers `unavailable` before it is tried again
GENERATE_THREAD = "omnimind-hf-generate"
LOAD_THREAD = "omnimind-hf-load"

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_RNG_LOCK = threading.Lock()  # torch's global generator: one sampling generate() at a time


# ---- weights -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelKey:
    model: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        return f"{self.model} ({self.gguf_file})" if self.gguf_file else self.model


class LoadError(Exception):
    """The weights could not be loaded; the message says why, for the `unavailable` error."""


@dataclass(slots=True)
class LoadedModel:
    """A model and its tokenizer, ready to generate; one `generate()` at a time (`lock`)."""

    model: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    eos_ids: tuple[int, ...]
    pad_id: int | None
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: the backend configuration the answer came from."""
        return f"transformers-{self.device}-{_dtype_name(self.dtype)}"


def resolve_source(model: str) -> str:
    """Where `from_pretrained` finds the weights: a folder, or a hub id left as it is."""
    if model.startswith("package:"):
        return str(_package_dir(model.removeprefix("package:")))
    path = Path(model).expanduser()
    if model.startswith(("/", ".", "~")) or path.is_dir():
        if not path.is_dir():
            raise LoadError(f"no such directory: {path}")
        return str(path)
    return model


def _package_dir(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"python package '{name}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_device(device: str) -> str:
    """`auto`: cuda, then mps, then cpu. A device asked for must be there."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"device '{device}' is configured but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LoadError("device 'mps' is configured but MPS is not available")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise LoadError(f"unknown dtype '{dtype}' (use auto, {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def load_model(key: ModelKey, device: str, dtype: str, token: str | None) -> LoadedModel:
    """Load tokenizer and model (blocking: call it on a worker thread)."""
    started = time.perf_counter()
    source = resolve_source(key.model)
    if key.gguf_file and Path(source).is_dir() and not (Path(source) / key.gguf_file).is_file():
        raise LoadError(f"no file {key.gguf_file} in {source}")
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    log.info("loading model %s from %s on %s as %s", key, source, where, _dtype_name(torch_dtype))
    kwargs: dict[str, Any] = {"token": token} if token else {}
    if key.gguf_file:
        kwargs["gguf_file"] = key.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    log.info("model %s: tokenizer loaded after %.1f s", key, time.perf_counter() - started)
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model.to(where)
    model.eval()
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters()) / 1e6
    log.info(
        "loaded model %s in %.1f s: %.1fM parameters on %s as %s",
        key, seconds, params, where, _dtype_name(torch_dtype),
    )  # fmt: skip
    return LoadedModel(model, tokenizer, where, torch_dtype, eos_ids, pad_id, seconds)


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise LoadError("the model has no end-of-sequence token")
    return tuple(dict.fromkeys(ids))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LoadError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return f"out of memory: {exc}".strip()
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- the request -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Params:
    """What one chat request asks of `generate()`, validated."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stops: tuple[str, ...] = ()

    @property
    def sample(self) -> bool:
        return self.temperature > 0 and self.top_p != 0


def _client_error(message: str, param: str | None = None) -> UpstreamError:
    return UpstreamError(CLIENT_ERROR, message, 400, param=param)


def parse_params(call: Call, default_max_tokens: int) -> Params:
    """The request's messages and sampling options; a request wrong anywhere is a client error."""
    try:
        body: ChatBody = call.request.decode(ChatBody)
    except InvalidRequest as exc:
        raise _client_error(exc.message, exc.param) from None
    if not body.messages:
        raise _client_error("'messages' must contain at least one message.", "messages")
    messages = []
    for i, message in enumerate(body.messages):
        if message.role not in _ROLES:
            raise _client_error(
                f"Invalid value '{message.role}' for 'messages[{i}].role': expected one of "
                + ", ".join(sorted(_ROLES)),
                f"messages[{i}].role",
            )
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text()})
    limit = body.token_limit()
    if limit is not None and limit < 1:
        raise _client_error("'max_tokens' must be at least 1.", "max_tokens")
    if body.temperature is not None and not 0 <= body.temperature <= 2:
        raise _client_error("'temperature' must be between 0 and 2.", "temperature")
    if body.top_p is not None and not 0 <= body.top_p <= 1:
        raise _client_error("'top_p' must be between 0 and 1.", "top_p")
    if body.n is not None and body.n > 1:
        # A fine request, just not one this adapter serves: the chain moves on.
        raise UpstreamError("unavailable", "n > 1 is not supported by local inference")
    return Params(
        messages=messages,
        max_new_tokens=limit or default_max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p,
        seed=body.seed,
        stops=tuple(s for s in body.stops() if s),
    )


def encode_prompt(loaded: LoadedModel, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The chat template applied to the messages: input ids and attention mask on the device."""
    tokenizer = loaded.tokenizer
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        special = False  # the template writes its own BOS and role markers
    else:  # a base model: a plain transcript
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        special = True
    inputs = tokenizer(text, add_special_tokens=special, return_tensors="pt")
    return {
        k: v.to(loaded.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")
    }


def generation_config(loaded: LoadedModel, params: Params) -> GenerationConfig:
    """Explicit settings, so neither the model's defaults nor transformers' warnings surprise."""
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "eos_token_id": list(loaded.eos_ids),
        "pad_token_id": loaded.pad_id,
        "do_sample": params.sample,
    }
    if params.sample:
        options["temperature"] = params.temperature
        options["top_p"] = params.top_p if params.top_p is not None else 1.0
        # OpenAI's API has no top_k: only a model that asks for one gets it.
        options["top_k"] = loaded.model.generation_config.top_k or 0
    return GenerationConfig(**options)


# ---- the worker thread -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done:
    """The end of one generation."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> Usage:
        total = self.prompt_tokens + self.completion_tokens
        return Usage(self.prompt_tokens, self.completion_tokens, total)


class _Halt(StoppingCriteria):
    """Stops generate() before its next token once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        halted = self.event.is_set()
        return torch.full((input_ids.shape[0],), halted, dtype=torch.bool, device=input_ids.device)


class TextFeed:
    """A generate() streamer: generated ids in, text deltas out (to `emit`), cut at stops."""

    def __init__(
        self, tokenizer: Any, stops: tuple[str, ...], halt: threading.Event,
        emit: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.halt = halt
        self.emit = emit
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.prompt_seen = False
        self.stop_hit = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.stop_hit or self.halt.is_set():
            return  # generate() runs one more step after a stop; that token is not ours
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        self._advance(final=False)

    def end(self) -> None:
        if not self.stop_hit:
            self._advance(final=True)

    def _advance(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        ready = len(text)
        cut = find_stop(text, self.stops, max(0, self.sent - self.longest))
        if cut is not None:
            self.stop_hit = True
            self.halt.set()
            ready = cut
        elif not final:
            ready = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence: wait for more
            ready -= partial_stop(text[:ready], self.stops)
        if ready > self.sent:
            self.emit(text[self.sent : ready])
            self.sent = ready


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (searching from `start`), if any."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@contextlib.contextmanager
def _random_state(params: Params) -> Iterator[None]:
    if not params.sample:
        yield
        return
    with _RNG_LOCK:
        if params.seed is not None:
            torch.manual_seed(params.seed % 2**64)
        yield


def _acquire(lock: threading.Lock, halt: threading.Event) -> bool:
    """Take the model's lock, unless the request is given up while waiting for it."""
    while not lock.acquire(timeout=0.05):
        if halt.is_set():
            return False
    return True


def generate(
    loaded: LoadedModel, params: Params, halt: threading.Event, emit: Callable[[str], None]
) -> Done | None:
    """Run one generation (blocking); text goes to `emit`. None when halted from outside."""
    if not _acquire(loaded.lock, halt):
        return None
    try:
        if halt.is_set():
            return None
        return _generate(loaded, params, halt, emit)
    finally:
        loaded.lock.release()


def _generate(
    loaded: LoadedModel, params: Params, halt: threading.Event, emit: Callable[[str], None]
) -> Done | None:
    inputs = encode_prompt(loaded, params.messages)
    feed = TextFeed(loaded.tokenizer, params.stops, halt, emit)
    started = time.perf_counter()
    with _random_state(params), torch.inference_mode():
        loaded.model.generate(
            **inputs,
            generation_config=generation_config(loaded, params),
            streamer=feed,
            stopping_criteria=StoppingCriteriaList([_Halt(halt)]),
        )
    count = len(feed.ids)
    log.debug("generated %d tokens in %.2f s", count, time.perf_counter() - started)
    if feed.stop_hit or (feed.ids and feed.ids[-1] in loaded.eos_ids):
        reason = "stop"
    elif halt.is_set():
        return None  # given up by the request: nobody waits for the end
    else:
        reason = "length"
    return Done(reason, int(inputs["input_ids"].shape[1]), count)


def _generation_error(exc: Exception) -> UpstreamError:
    if isinstance(exc, jinja2.TemplateError):  # this model's template refuses these messages
        return UpstreamError("unavailable", f"the chat template rejects the messages: {exc}")
    return UpstreamError("server_error", f"generation failed: {_describe(exc)}")


Event = str | Done | UpstreamError


class Generation:
    """One request's generate() on its own thread, read from the event loop as events."""

    def __init__(
        self, loaded: LoadedModel, params: Params, on_exit: Callable[[Generation], None]
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.halt = threading.Event()
        self.loaded = loaded
        self._params = params
        self._on_exit = on_exit
        self.thread = threading.Thread(target=self._run, name=GENERATE_THREAD, daemon=True)

    def start(self) -> None:
        self.thread.start()

    async def next(self) -> str | Done:
        """The next text delta, or `Done`; raises the generation's error."""
        event = await self.events.get()
        if isinstance(event, UpstreamError):
            raise event
        return event

    def stop(self) -> None:
        self.halt.set()

    def _push(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.halt.set()

    def _run(self) -> None:
        try:
            done = generate(self.loaded, self._params, self.halt, self._push)
            if done is not None:
                self._push(done)
        except Exception as exc:  # noqa: BLE001 - handed to the request as an UpstreamError
            self._push(_generation_error(exc))
        finally:
            self._on_exit(self)


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
        self._closed = False

    # -- loading

    def preload(self, entries: Iterable[Entry]) -> None:
        """Start loading every model these entries name (background threads; returns at once).

        Safe without an event loop, so the engine can call it while it builds providers.
        """
        for entry in entries:
            if entry.provider == self.name:
                self._slot(ModelKey(entry.model, entry.gguf_file))

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
            message = f"cannot load model {key}: {_describe(exc)}"
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
        generation = Generation(loaded, params, self._running.discard)
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
