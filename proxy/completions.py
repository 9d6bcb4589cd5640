"""`POST /v1/completions` (OpenAI's legacy text completions): wire shapes, the checks every
provider shares, and the answer builders the translating adapters (Ollama, local) use.

OpenAI-compatible upstreams get the client's body untouched (only `model` changes), so
they honour everything they support. Adapters that translate serve one prompt, a string
(or token ids where the model has a tokenizer), as a raw prompt: no chat template.
`translatable()` says what they cannot honour: `suffix`, `logprobs`, `best_of` > 1,
`n` > 1, several prompts; those are `unsupported` there, so the chain moves on and a
request no entry can serve is a 400. `echo` is honoured (the prompt is sent back before
the completion, as the first chunk of a stream).

`max_tokens` defaults to 16, as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .embeddings import decode_body
from .errors import InvalidRequest, UpstreamError
from .pipeline import Context, Reply
from .providers import Op
from .routes_chat import serve
from .wire import ApiRequest, Usage, encode

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 2048
MAX_STOPS = 4

FinishReason = Literal["stop", "length", "content_filter"]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class CompletionBody(msgspec.Struct, kw_only=True):
    """The request body, typed. `prompt` is checked by `completion_prompts`."""

    model: str
    prompt: Any = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A checked request; `prompts` is a list of strings or of token-id lists."""

    body: CompletionBody
    prompts: list[str] | list[list[int]]

    @property
    def stream(self) -> bool:
        return bool(self.body.stream)

    @property
    def include_usage(self) -> bool:
        options = self.body.stream_options
        return bool(options and options.include_usage)


_body_decoder = msgspec.json.Decoder(CompletionBody)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The request checked as OpenAI checks it; anything malformed raises `InvalidRequest`."""
    body = decode_body(_body_decoder, raw)
    _check_range(body.max_tokens, "max_tokens", 0, None)
    _check_range(body.temperature, "temperature", 0, 2)
    _check_range(body.top_p, "top_p", 0, 1)
    _check_range(body.n, "n", 1, 128)
    _check_range(body.logprobs, "logprobs", 0, 5)
    _check_range(body.best_of, "best_of", 0, 20)
    _check_range(body.presence_penalty, "presence_penalty", -2, 2)
    _check_range(body.frequency_penalty, "frequency_penalty", -2, 2)
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOPS:
        raise InvalidRequest(f"'stop' may hold at most {MAX_STOPS} sequences.", param="stop")
    if body.best_of is not None and body.best_of > 1 and body.stream:
        raise InvalidRequest("'best_of' cannot be used with 'stream'.", param="best_of")
    if body.best_of is not None and body.best_of < (body.n or 1):
        raise InvalidRequest("'best_of' must be at least 'n'.", param="best_of")
    return CompletionRequest(body, completion_prompts(body.prompt))


def _check_range(value: float | None, name: str, low: float, high: float | None) -> None:
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"'{name}' must be {bound}, got {value}.", param=name)


def completion_prompts(value: Any) -> list[str] | list[list[int]]:
    """`prompt` as a list of strings or of token lists (OpenAI: absent means one empty)."""
    if value is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise _bad_prompt("'prompt' must be a string, an array of strings or of token arrays.")
    if len(value) > MAX_PROMPTS:
        raise _bad_prompt(f"'prompt' must have at most {MAX_PROMPTS} items, got {len(value)}.")
    first = value[0]
    if isinstance(first, str):
        if not all(isinstance(p, str) for p in value):
            raise _bad_prompt("'prompt' must not mix strings with other values.")
        return value
    if _is_token(first):
        return [_tokens(value, "prompt")]
    if isinstance(first, list):
        return [_tokens(p, f"prompt[{i}]") for i, p in enumerate(value)]
    raise _bad_prompt("'prompt' must be a string, an array of strings or of token arrays.")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokens(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise _bad_prompt(f"'{where}' must be a non-empty array of token ids.")
    if not all(_is_token(t) and t >= 0 for t in value):
        raise _bad_prompt(f"'{where}' must hold non-negative integer token ids only.")
    return value


def _bad_prompt(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="prompt", code="invalid_value")


class CompletionApiRequest(ApiRequest):
    """`POST /v1/completions`: the body checked once, when the request is built."""

    __slots__ = ("checked",)
    required = "prompt"

    def check(self) -> None:
        super().check()
        self.checked = parse_completion_request(self.raw)


def completion_request(request: ApiRequest) -> CompletionRequest:
    """The checked completion request an adapter serves (checked here if it was not yet)."""
    if isinstance(request, CompletionApiRequest):
        return request.checked
    return parse_completion_request(request.raw)


# ---- what a translating adapter serves -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawPrompt:
    """One prompt for a model without a chat template, and how to sample it."""

    prompt: str | list[int]
    max_tokens: int
    temperature: float | None
    top_p: float | None
    seed: int | None
    stops: tuple[str, ...]
    presence_penalty: float | None
    frequency_penalty: float | None
    echo: bool


def translatable(request: CompletionRequest, where: str, tokens: bool) -> RawPrompt:
    """The request as one raw prompt, or `unsupported` naming what `where` cannot honour.

    `tokens`: whether this provider accepts a prompt of token ids.
    """
    body = request.body
    if body.suffix:
        raise _unsupported(where, "'suffix'", "suffix")
    if body.logprobs is not None:
        raise _unsupported(where, "'logprobs'", "logprobs")
    if body.best_of is not None and body.best_of > 1:
        raise _unsupported(where, "'best_of' > 1", "best_of")
    if body.n is not None and body.n > 1:
        raise _unsupported(where, "'n' > 1", "n")
    if body.logit_bias:
        raise _unsupported(where, "'logit_bias'", "logit_bias")
    if len(request.prompts) > 1:
        raise _unsupported(where, "more than one prompt", "prompt")
    prompt = request.prompts[0]
    if isinstance(prompt, list) and not tokens:
        raise _unsupported(where, "a prompt of token ids", "prompt")
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return RawPrompt(
        prompt=prompt,
        max_tokens=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stops=tuple(s for s in stops if s),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        echo=bool(body.echo),
    )


def _unsupported(where: str, what: str, param: str) -> UpstreamError:
    return UpstreamError("unsupported", f"{where} cannot honour {what}", param=param)


# ---- answers -----------------------------------------------------------------------------------


class TextChoice(msgspec.Struct):
    text: str
    index: int
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET
    system_fingerprint: str | msgspec.UnsetType = msgspec.UNSET


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class TextAnswer:
    """The `text_completion` bodies and stream payloads of one answer."""

    model: str
    id: str = ""
    created: int = 0
    fingerprint: str | msgspec.UnsetType = msgspec.UNSET

    @classmethod
    def new(cls, model: str, fingerprint: str | None = None) -> TextAnswer:
        return cls(model, completion_id(), int(time.time()), fingerprint or msgspec.UNSET)

    def body(self, text: str, finish_reason: FinishReason, usage: Usage) -> bytes:
        choice = TextChoice(text, 0, None, finish_reason)
        return encode(self._object([choice], usage))

    def chunk(self, text: str, finish_reason: FinishReason | None = None) -> bytes:
        return encode(self._object([TextChoice(text, 0, None, finish_reason)], msgspec.UNSET))

    def usage_chunk(self, usage: Usage) -> bytes:
        return encode(self._object([], usage))

    def _object(
        self, choices: list[TextChoice], usage: Usage | msgspec.UnsetType
    ) -> TextCompletion:
        return TextCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            system_fingerprint=self.fingerprint,
        )


def finish_reason(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


# ---- the route ---------------------------------------------------------------------------------


async def route(ctx: Context) -> Reply:
    """`POST /v1/completions`: served from the alias's chain like chat, streamed or not."""
    return await serve(ctx, CompletionApiRequest(ctx.body), Op.COMPLETION)
