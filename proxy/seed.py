"""The seed's types, and how the engine's answers and failures become them.

`LLMModelTier` names a models.yaml alias, `LLMProvider` the default providers,
`LLMResponse` is one answer or one structured failure, `LLMError` a failed stream. The
functions read an engine `Answer` (or a `GatewayError`) into an `LLMResponse`; the router
(`router.py`) does the calling.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .config import Config
from .errors import AllProvidersFailed, Attempt, GatewayError, InvalidRequest, UpstreamRejected
from .streaming import Answer
from .wire import ChatRequest


class LLMModelTier(enum.StrEnum):
    """The seed's tiers; each value is the models.yaml alias that serves it."""

    FAST = "omnimind-fast"
    BALANCED = "omnimind-balanced"
    HIGH_QUALITY = "omnimind-hq"

    @property
    def alias(self) -> str:
        return self.value


class LLMProvider(enum.StrEnum):
    """The seed's provider names (the providers of the default models.yaml)."""

    OLLAMA = "ollama"
    HUGGINGFACE = "huggingface"
    OPENROUTER = "openrouter"


@dataclass(slots=True)
class LLMResponse:
    """One answer, or one structured failure (`success=False`, `error` says why).

    `latency_ms` is the answering provider's, in whole milliseconds as in the seed's
    dataclass (for a failure: the whole call's);
    `attempts` are the entries that failed or were skipped before it, in order.
    """

    success: bool
    text: str = ""
    provider: str = ""
    model: str = ""
    latency_ms: int = 0
    tokens_used: int = 0
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    cost_usd: float | None = None

    @property
    def fallbacks(self) -> list[str]:
        """`provider:reason` for each failed attempt, as in the `x-omnimind-fallbacks` header."""
        return [f"{a.provider}:{a.reason}" for a in self.attempts]


class LLMError(Exception):
    """A stream failed; `response` is the structured failure (error, attempts, partial text)."""

    def __init__(self, response: LLMResponse) -> None:
        super().__init__(response.error)
        self.response = response

    @property
    def attempts(self) -> list[Attempt]:
        return self.response.attempts


# ---- reading answers ---------------------------------------------------------------------


class _Message(msgspec.Struct):
    content: Any = None  # a string, or (from a few upstreams) a list of content parts
    tool_calls: list[dict[str, Any]] | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None  # chat.completion
    delta: _Message | None = None  # chat.completion.chunk


class _View(msgspec.Struct):
    choices: list[_Choice] = []


_view = msgspec.json.Decoder(_View)


def delta_text(chunk: bytes) -> str:
    """The text of a `chat.completion.chunk` ("" for a chunk without any)."""
    try:
        choices = _view.decode(chunk).choices
    except msgspec.DecodeError:
        return ""  # the provider checked it is JSON; a chunk of another shape
    return _text(choices[0].delta) if choices else ""


def _text(message: _Message | None) -> str:
    content = None if message is None else message.content
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def answered(answer: Answer) -> LLMResponse:
    try:
        choices = _view.decode(answer.body).choices
    except msgspec.DecodeError:
        choices = []
    message = choices[0].message if choices else None
    if message is None:
        error = f"{answer.provider} ({answer.model}) answered without a message"
        latency = round(answer.latency_ms)
        return LLMResponse(False, "", answer.provider, answer.model, latency, 0, error)
    usage = answer.usage
    tokens = (
        0 if usage is None else usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
    )
    return LLMResponse(
        success=True,
        text=_text(message),
        provider=answer.provider,
        model=answer.model,
        latency_ms=round(answer.latency_ms),
        tokens_used=tokens,
        attempts=answer.attempts,
        tool_calls=message.tool_calls or [],
        cost_usd=answer.cost_usd,
    )


def _describe(attempts: list[Attempt]) -> str:
    parts = []
    for a in attempts:
        part = f"{a.provider} ({a.model}): {a.reason}" + (f" {a.status}" if a.status else "")
        parts.append(part + (f" - {a.message}" if a.message else ""))
    return "; ".join(parts) or "no entry could be tried"


def failed(exc: GatewayError, alias: str, started: float) -> LLMResponse:
    attempts: list[Attempt] = []
    if isinstance(exc, AllProvidersFailed):
        attempts = exc.attempts
        error = f"All providers for '{alias}' failed: {_describe(attempts)}"
    elif isinstance(exc, UpstreamRejected):
        attempts = exc.attempts
        error = f"The upstream rejected the request ({exc.status}): {exc.message}"
    else:
        error = exc.message
    latency = round((time.perf_counter() - started) * 1000)
    return LLMResponse(False, latency_ms=latency, error=error, attempts=attempts)


# ---- building requests -------------------------------------------------------------------

_RESERVED = frozenset({"model", "messages", "stream"})


def tier_alias(config: Config, tier: LLMModelTier | str) -> str:
    """The models.yaml alias for a tier (a `LLMModelTier`, its name, or an alias)."""
    value = str(tier)
    if value not in config.models:
        named = LLMModelTier.__members__.get(value.upper())
        if named is not None and named.value in config.models:
            return named.value
        raise ValueError(
            f"Unknown tier or model alias {value!r}; models.yaml defines: "
            + ", ".join(config.models)
        )
    return value


def build_request(
    config: Config,
    prompt: str | Sequence[Mapping[str, Any]],
    tier: LLMModelTier | str,
    preferred_provider: LLMProvider | str | None,
    params: dict[str, Any],
    stream: bool,
) -> tuple[ChatRequest, str, str | None]:
    """A seed call as the engine's request (built directly, no JSON round trip)."""
    alias = tier_alias(config, tier)
    prefer = None
    if preferred_provider is not None:
        prefer = str(preferred_provider)
        if prefer not in config.providers:
            raise ValueError(
                f"Unknown provider {prefer!r}; models.yaml defines: " + ", ".join(config.providers)
            )
    reserved = _RESERVED.intersection(params)
    if reserved:
        raise ValueError(f"{', '.join(sorted(reserved))} cannot be given as a parameter")
    if isinstance(prompt, str):
        messages: list[Any] = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, Sequence):
        raise TypeError("prompt must be a string or a list of chat messages (dicts)")
    else:
        messages = [dict(m) for m in prompt if isinstance(m, Mapping)]
        if len(messages) != len(prompt):
            raise TypeError("prompt must be a string or a list of chat messages (dicts)")
    body = {"model": alias, "messages": messages, **params, "stream": stream}
    try:
        return ChatRequest.from_obj(body), alias, prefer
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None
