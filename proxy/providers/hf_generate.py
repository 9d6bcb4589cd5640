"""One local generation: request parameters, and `model.generate` on a worker thread.

A streamer (`TextFeed`) decodes the generated ids into text deltas, holds back an
incomplete UTF-8 sequence (a trailing U+FFFD) and any tail that could be the start of a
stop string, cuts the text at the first stop string, and hands each delta to the event
loop with `call_soon_threadsafe`. A `StoppingCriteria` checks a `threading.Event` before
every token, so a closed stream, a timeout or a disconnected client stops the thread
within one decoding step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ..errors import InvalidRequest, UpstreamError
from ..policy import CLIENT_ERROR
from ..wire import (
    ChatBody,
    Usage,
)
from .base import Call
from .hf_weights import LoadedModel, describe, log

GENERATE_THREAD = "omnimind-hf-generate"

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RNG_LOCK = threading.Lock()  # torch's global generator: one sampling generate() at a time


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
        raise UpstreamError("unsupported", "n > 1 is not supported by local inference")
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
        self.add(int(t) for t in value.reshape(-1).tolist())

    def add(self, ids: Iterable[int]) -> None:
        """Newly generated ids (after the prompt)."""
        if self.stop_hit or self.halt.is_set():
            return  # generate() runs one more step after a stop; that token is not ours
        self.ids.extend(ids)
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
def random_state(params: Params) -> Iterator[None]:
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
        return generate_unlocked(loaded, params, halt, emit)
    finally:
        loaded.lock.release()


def generate_unlocked(
    loaded: LoadedModel, params: Params, halt: threading.Event, emit: Callable[[str], None]
) -> Done | None:
    """`generate()` for a caller that holds the model's lock."""
    inputs = encode_prompt(loaded, params.messages)
    feed = TextFeed(loaded.tokenizer, params.stops, halt, emit)
    started = time.perf_counter()
    with random_state(params), torch.inference_mode():
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
        return UpstreamError("unsupported", f"the chat template rejects the messages: {exc}")
    return UpstreamError("server_error", f"generation failed: {describe(exc)}")


Event = str | Done | UpstreamError
# generate() or a stand-in with its signature (`hf_batch.generate_batched`, partially applied)
Runner = Callable[[LoadedModel, Params, threading.Event, Callable[[str], None]], Done | None]


class Generation:
    """One request's generate() on its own thread, read from the event loop as events."""

    def __init__(
        self,
        loaded: LoadedModel,
        params: Params,
        on_exit: Callable[[Generation], None],
        run: Runner | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._generate: Runner = run or generate
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
            done = self._generate(self.loaded, self._params, self.halt, self._push)
            if done is not None:
                self._push(done)
        except Exception as exc:  # noqa: BLE001 - handed to the request as an UpstreamError
            self._push(_generation_error(exc))
        finally:
            self._on_exit(self)
