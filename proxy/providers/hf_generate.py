"""One local chat request: its parameters, its prompt ids, and its text as it is decoded.

`parse_params` validates what the request asks (a request wrong everywhere is a client
error); `prompt_ids` applies the chat template before the job is queued, so a prompt the
template refuses fails only itself. `TextFeed` turns generated ids into text deltas
incrementally (each token decodes a short window, not the whole answer), holds back an
incomplete UTF-8 sequence and any tail that could start a stop string, and cuts the text
at the first stop string. `Generation` is the request's end of it on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import jinja2

from ..completions import completion_request, translatable
from ..errors import InvalidRequest, UpstreamError
from ..policy import CLIENT_ERROR
from ..wire import ChatBody, Usage
from .base import Call
from .hf_grammar import GrammarError, OutputRule, output_rule
from .hf_weights import describe

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


# ---- the request -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Params:
    """What one chat request asks of the model, validated."""

    messages: list[dict[str, str]]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    stops: tuple[str, ...] = ()
    rule: OutputRule | None = None  # JSON output or a forced tool call (constrained decoding)
    raw: str | list[int] | None = None  # a legacy completion's prompt: no chat template
    echo: bool = False  # a legacy completion's answer starts with its prompt

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
    try:
        rule = output_rule(_raw(body.response_format), body.tools, body.tool_choice)
    except ValueError as exc:
        raise _client_error(str(exc), "response_format") from None
    return Params(
        rule=rule,
        messages=messages,
        max_new_tokens=limit or default_max_tokens,
        temperature=body.temperature or 0.0,
        top_p=body.top_p,
        seed=body.seed,
        stops=tuple(s for s in body.stops() if s),
    )


def raw_params(call: Call) -> Params:
    """A legacy completion (`/v1/completions`) as one raw prompt, text or token ids; what
    the local model cannot honour is `unsupported` (the chain moves on)."""
    try:
        raw = translatable(completion_request(call.request), "local inference", tokens=True)
    except InvalidRequest as exc:
        raise _client_error(exc.message, exc.param) from None
    if raw.max_tokens < 1:
        raise UpstreamError("unsupported", "local inference answers at least one token")
    if raw.presence_penalty or raw.frequency_penalty:
        raise UpstreamError("unsupported", "local inference has no presence or frequency penalty")
    return Params(
        messages=[], max_new_tokens=raw.max_tokens, temperature=raw.temperature or 0.0,
        top_p=raw.top_p, seed=raw.seed, stops=raw.stops, raw=raw.prompt, echo=raw.echo,
    )  # fmt: skip


def raw_ids(tokenizer: Any, prompt: str | list[int], vocab: int) -> list[int]:
    """A raw prompt's ids: text as the tokenizer reads it (its own special tokens added).
    What this model cannot start from is `unsupported`, as in `hf_embed`: another entry's
    model may (a larger vocabulary, a tokenizer that adds a BOS to an empty prompt)."""
    if isinstance(prompt, list):
        if any(i >= vocab for i in prompt):
            message = f"'prompt' holds a token id over this model's vocabulary ({vocab})"
            raise UpstreamError("unsupported", message, param="prompt")
        return prompt
    ids: list[int] = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise UpstreamError(
            "unsupported", "an empty prompt is no tokens to this model", param="prompt"
        )
    return ids


def _raw(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return value
    return {f: getattr(value, f) for f in value.__struct_fields__ if getattr(value, f) is not None}


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to the messages, as token ids (a base model: a transcript)."""
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except jinja2.TemplateError as exc:  # this model's template refuses these messages
            message = f"the chat template rejects the messages: {exc}"
            raise UpstreamError("unsupported", message) from None
        special = False  # the template writes its own BOS and role markers
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        special = True
    ids: list[int] = tokenizer(text, add_special_tokens=special)["input_ids"]
    return ids


@dataclass(frozen=True, slots=True)
class Done:
    """The end of one generation."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> Usage:
        total = self.prompt_tokens + self.completion_tokens
        return Usage(self.prompt_tokens, self.completion_tokens, total)


class TextFeed:
    """Generated ids in, text deltas out (to `emit`), cut at stops."""

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
        self.text = ""  # decoded so far (complete characters only)
        self.sent = 0  # characters of `text` already emitted
        self.prefix = 0  # ids[prefix:read] decode to the tail of `text` already taken
        self.read = 0
        self.stop_hit = False

    def add(self, ids: Iterable[int]) -> None:
        """Newly generated ids."""
        if self.stop_hit or self.halt.is_set():
            return
        self.ids.extend(ids)
        self._decode()
        self._advance(final=False)

    def end(self) -> None:
        if not self.stop_hit:
            self._decode(final=True)
            self._advance(final=True)

    def _decode(self, final: bool = False) -> None:
        """Take the text of the ids since `read`, decoded with a few ids before them."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def _advance(self, final: bool) -> None:
        text = self.text
        ready = len(text)
        cut = find_stop(text, self.stops, max(0, self.sent - self.longest))
        if cut is not None:
            self.stop_hit = True
            self.halt.set()
            ready = cut
        elif not final:
            ready -= partial_stop(text[self.sent :], self.stops)
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


Event = str | Done | BaseException


class Generation:
    """One request's side of a job: its text and end arrive here from the model's worker."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.halt = threading.Event()

    def emit(self, text: str) -> None:
        self._push(text)

    def finish(self, result: Done | BaseException | None) -> None:
        if result is not None:
            self._push(result)

    async def next(self) -> str | Done:
        """The next text delta, or `Done`; raises the generation's error."""
        event = await self.events.get()
        if isinstance(event, UpstreamError):
            raise event
        if isinstance(event, BaseException):
            raise _generation_error(event)
        return event

    def stop(self) -> None:
        self.halt.set()

    def _push(self, event: Event) -> None:
        held = _HELD.get()
        if held is not None:  # the worker's step: delivered with the step's other events
            held.append((self, event))
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.halt.set()


_HELD: contextvars.ContextVar[list[tuple[Generation, Event]] | None] = contextvars.ContextVar(
    "omnimind_held_events", default=None
)


@contextlib.contextmanager
def held_events() -> Iterator[None]:
    """Hold what generations push from this thread, then hand it to each event loop in one
    call: one wake-up a loop for a whole decode step, not one a row (at eight rows, the
    loop woke eight times a step and took the GIL from the worker each time)."""
    held: list[tuple[Generation, Event]] = []
    token = _HELD.set(held)
    try:
        yield
    finally:
        _HELD.reset(token)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, Event]]] = {}
        for generation, event in held:
            by_loop.setdefault(generation.loop, []).append((generation, event))
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the loop is closed: nobody listens any more
                for generation, _ in events:
                    generation.halt.set()


def _deliver(events: list[tuple[Generation, Event]]) -> None:
    for generation, event in events:
        generation.events.put_nowait(event)


def schema_error(exc: GrammarError) -> UpstreamError:
    """The request's output rule cannot be compiled or followed: the client's fault (400)."""
    return UpstreamError(CLIENT_ERROR, str(exc), 400, param="response_format")


def _generation_error(exc: BaseException) -> UpstreamError:
    if isinstance(exc, GrammarError):  # met mid-decode (e.g. an unsatisfiable minItems)
        return schema_error(exc)
    return UpstreamError("server_error", f"generation failed: {describe(exc)}")
