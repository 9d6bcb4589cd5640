"""models.yaml in two stages.

1. `parse()` decodes the YAML into msgspec Structs: the file's exact shape, unknown keys
   forbidden, providers a tagged union on `type`.
2. `load()` checks references between sections and resolves `${VAR}` / `${VAR:-default}`
   in exactly one place (`_expand`); secrets become `Secret`, masked in every repr.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class ConfigError(Exception):
    """A config that cannot be served; the message names the file, the key path and the fault."""


class Secret:
    """A credential: `reveal()` gives the value, nothing else ever prints it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__


# ---- stage 1: the file's shape ---------------------------------------------------------


class BreakerSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Circuit breaker (see health.py): eject after `failures` consecutive hard failures."""

    failures: PositiveInt = 5
    cooldown: PositiveFloat = 30.0  # first ejection; doubles on each repeated ejection
    max_cooldown: PositiveFloat = 300.0  # cap for ejections and for Retry-After
    rate_limit_cooldown: NonNegativeFloat = 1.0  # a 429 without Retry-After


class _Provider(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    timeout: PositiveFloat = 60.0
    connect_timeout: PositiveFloat = 5.0
    first_token_timeout: PositiveFloat = 30.0
    max_concurrency: PositiveInt | None = None
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 128
    retries: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0  # same-provider retries, jittered
    retry_backoff: PositiveFloat = 0.25
    breaker: BreakerSpec = msgspec.field(default_factory=BreakerSpec)


class OpenAISpec(_Provider, tag="openai"):
    """Any OpenAI-compatible endpoint: OpenAI, OpenRouter, vLLM, llama.cpp, Ollama's /v1."""

    base_url: str
    api_key: str | None = None
    headers: dict[str, str] = {}


class OllamaSpec(_Provider, tag="ollama"):
    """Ollama's native API (/api/chat, NDJSON)."""

    base_url: str = "${OLLAMA_BASE_URL:-http://localhost:11434}"
    headers: dict[str, str] = {}
    options: dict[str, Any] = {}
    keep_alive: str | int | None = None
    check_models: bool = True


class HuggingFaceSpec(_Provider, tag="huggingface"):
    """Local `transformers` inference; each entry's `model` names the weights."""

    device: str = "auto"
    dtype: str = "auto"
    preload: bool = False
    max_new_tokens: PositiveInt = 512
    timeout: PositiveFloat = 300.0
    first_token_timeout: PositiveFloat = 120.0
    max_concurrency: PositiveInt | None = 1
    max_batch: PositiveInt = 1  # > 1: waiting requests share one generate() (needs concurrency)
    batch_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 10.0  # for a batch to fill


ProviderSpec = OpenAISpec | OllamaSpec | HuggingFaceSpec


class EntrySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    provider: str
    model: str
    timeout: PositiveFloat | None = None
    connect_timeout: PositiveFloat | None = None
    first_token_timeout: PositiveFloat | None = None
    gguf_file: str | None = None
    input_cost_per_mtok: NonNegativeFloat | None = None
    output_cost_per_mtok: NonNegativeFloat | None = None


class CacheSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The exact response cache (proxy/cache.py): on an alias, or for all in `server.cache`."""

    ttl: PositiveFloat = 300.0  # seconds
    max_entries: PositiveInt = 10_000


class AliasSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The long form of an alias: its chain plus alias-level options."""

    chain: list[EntrySpec]
    hedge_after_ms: PositiveInt | None = None  # start the next entry too if no first chunk yet
    cache: CacheSpec | None = None


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A gateway API key with a name (for logs and metrics) and its own rate limit."""

    id: str
    key: str
    rate_limit_rpm: PositiveInt | None = None
    rate_limit_tpm: PositiveInt | None = None


class StateSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where limits, health, usage and the cache live (proxy/state/): in-process or Redis."""

    backend: Literal["memory", "redis"] = "memory"
    url: str = "${REDIS_URL:-redis://127.0.0.1:6379/0}"
    prefix: str = "omnimind"
    timeout_ms: PositiveInt = 50  # every Redis call; past it the call serves on local state
    on_error: Literal["open", "closed"] = "open"  # rate limits while Redis is unreachable


class ServerSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    request_timeout: PositiveFloat = 600.0
    max_body_bytes: PositiveInt = 16 * 1024 * 1024
    # JSON lines to stdout, stderr, a file path, or off (YAML reads a bare off as false)
    audit_log: str | bool = "stdout"
    log_content: bool = False  # put request messages into the audit log
    api_keys: list[str | KeySpec] = []  # none: no key needed (fine on 127.0.0.1)
    rate_limit_rpm: PositiveInt | None = None  # per key (per client address without keys)
    rate_limit_tpm: PositiveInt | None = None  # tokens per minute, charged from usage
    metrics_auth: bool = False  # require a key for /metrics too
    state: StateSpec = msgspec.field(default_factory=StateSpec)
    cache: CacheSpec | None = None  # every alias (an alias's own `cache` wins)


class ConfigSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    providers: dict[str, ProviderSpec]
    models: dict[str, list[EntrySpec] | AliasSpec]
    server: ServerSpec = msgspec.field(default_factory=ServerSpec)


# ---- stage 2: runtime objects ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    spec: ProviderSpec  # strings expanded; `api_key` moved out into `api_key`
    api_key: Secret | None = None
    headers: dict[str, str] = field(default_factory=dict)
    unavailable: str | None = None  # why this provider cannot be used, if it cannot


@dataclass(frozen=True, slots=True)
class Entry:
    provider: str
    model: str
    timeout: float
    connect_timeout: float
    first_token_timeout: float
    gguf_file: str | None = None
    input_cost_per_mtok: float | None = None
    output_cost_per_mtok: float | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    secret: Secret
    rate_limit_rpm: int | None
    rate_limit_tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    providers: dict[str, ProviderConfig]
    models: dict[str, tuple[Entry, ...]]
    server: ServerSpec
    missing_env: tuple[str, ...] = ()
    hedges: dict[str, float] = field(default_factory=dict)  # alias -> hedge delay, seconds
    api_keys: tuple[ApiKey, ...] = ()
    caches: dict[str, CacheSpec] = field(default_factory=dict)  # alias -> its response cache


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(text: str, missing: list[str]) -> str:
    """The one place `${VAR}` and `${VAR:-default}` are resolved from the environment."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                missing.append(name)
                return ""
            return default
        return value

    return _VAR.sub(sub, text)


def parse(text: str, path: str = "models.yaml") -> ConfigSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'providers' and 'models'")
    unknown = set(raw) - {"providers", "models", "server"}
    if unknown:
        raise ConfigError(f"{path}: at (top level): unknown key '{sorted(unknown)[0]}'")
    providers = _mapping(raw, "providers", path)
    models = _mapping(raw, "models", path)
    # Section by section, so that errors name the provider or alias (msgspec says "[...]").
    return ConfigSpec(
        providers={
            str(k): _convert(v, ProviderSpec, f"providers.{k}", path) for k, v in providers.items()
        },
        models={
            str(k): _convert(v, list[EntrySpec] | AliasSpec, f"models.{k}", path)
            for k, v in models.items()
        },
        server=_convert(raw.get("server") or {}, ServerSpec, "server", path),
    )


def _mapping(raw: dict[str, Any], key: str, path: str) -> dict[Any, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        got = "nothing" if value is None else type(value).__name__
        raise ConfigError(f"{path}: at {key}: expected a mapping, got {got}")
    return value


def _convert(value: Any, type_: Any, where: str, path: str) -> Any:
    try:
        return msgspec.convert(value, type_, strict=True)
    except msgspec.ValidationError as exc:
        what, sep, at = str(exc).rpartition(" - at ")
        if not sep:
            what, at = str(exc), "`$`"
        key = where + at.strip("`").removeprefix("$")
        raise ConfigError(f"{path}: at {key}: {what}") from None


def load(path: str | os.PathLike[str]) -> Config:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    return build(parse(text, path), path)


def build(spec: ConfigSpec, path: str = "models.yaml") -> Config:
    missing: list[str] = []
    providers = {name: _provider(name, p, missing, path) for name, p in spec.providers.items()}
    models: dict[str, tuple[Entry, ...]] = {}
    hedges: dict[str, float] = {}
    caches: dict[str, CacheSpec] = {}
    for alias, value in spec.models.items():
        entries = value if isinstance(value, list) else value.chain
        if isinstance(value, AliasSpec) and value.hedge_after_ms:
            hedges[alias] = value.hedge_after_ms / 1000
        cache = value.cache if isinstance(value, AliasSpec) and value.cache else spec.server.cache
        if cache is not None:
            caches[alias] = cache
        if not entries:
            raise ConfigError(f"{path}: at models.{alias}: a chain needs at least one entry")
        models[alias] = tuple(
            _entry(e, providers, f"models.{alias}[{i}]", path) for i, e in enumerate(entries)
        )
    keys = _api_keys(spec.server, missing, path)
    state = spec.server.state
    server = msgspec.structs.replace(
        spec.server, state=msgspec.structs.replace(state, url=_expand(state.url, missing))
    )
    missing_env = tuple(dict.fromkeys(missing))
    return Config(path, providers, models, server, missing_env, hedges, keys, caches)


def _api_keys(server: ServerSpec, missing: list[str], path: str) -> tuple[ApiKey, ...]:
    keys = []
    for i, item in enumerate(server.api_keys):
        spec = item if isinstance(item, KeySpec) else KeySpec(id=f"key{i}", key=item)
        secret = Secret(_expand(spec.key, missing))
        if not secret:
            raise ConfigError(
                f"{path}: at server.api_keys[{i}]: the key resolves to an empty string "
                "(is its environment variable set?)"
            )
        rpm = spec.rate_limit_rpm or server.rate_limit_rpm
        keys.append(ApiKey(spec.id, secret, rpm, spec.rate_limit_tpm or server.rate_limit_tpm))
    return tuple(keys)


def _provider(name: str, spec: ProviderSpec, missing: list[str], path: str) -> ProviderConfig:
    key: Secret | None = None
    unavailable = None
    changes: dict[str, Any] = {}
    headers = {k: _expand(v, missing) for k, v in getattr(spec, "headers", {}).items()}
    if isinstance(spec, OpenAISpec | OllamaSpec):
        base_url = _expand(spec.base_url, missing).rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{path}: at providers.{name}.base_url: expected an http(s) URL, got {base_url!r}"
            )
        changes["base_url"] = base_url
    if isinstance(spec, OpenAISpec) and spec.api_key is not None:
        key = Secret(_expand(spec.api_key, missing))
        changes["api_key"] = None
        if not key:
            unavailable = "api_key is empty"
    if (
        isinstance(spec, HuggingFaceSpec)
        and (spec.max_concurrency or spec.max_batch) < spec.max_batch
    ):
        raise ConfigError(
            f"{path}: at providers.{name}.max_batch: {spec.max_batch} is more than "
            f"max_concurrency ({spec.max_concurrency}), so no batch could fill; raise "
            "max_concurrency to at least max_batch"
        )
    if changes:
        spec = msgspec.structs.replace(spec, **changes)
    return ProviderConfig(name, spec, key, headers, unavailable)


def _entry(e: EntrySpec, providers: dict[str, ProviderConfig], where: str, path: str) -> Entry:
    provider = providers.get(e.provider)
    if provider is None:
        known = ", ".join(sorted(providers)) or "none"
        raise ConfigError(
            f"{path}: at {where}.provider: unknown provider '{e.provider}' (defined: {known})"
        )
    p = provider.spec
    if e.gguf_file is not None and not isinstance(p, HuggingFaceSpec):
        raise ConfigError(f"{path}: at {where}.gguf_file: only huggingface providers load gguf")
    return Entry(
        provider=e.provider,
        model=e.model,
        timeout=e.timeout or p.timeout,
        connect_timeout=e.connect_timeout or p.connect_timeout,
        first_token_timeout=e.first_token_timeout or p.first_token_timeout,
        gguf_file=e.gguf_file,
        input_cost_per_mtok=e.input_cost_per_mtok,
        output_cost_per_mtok=e.output_cost_per_mtok,
    )


def default_path() -> str:
    return os.environ.get("OMNIMIND_CONFIG") or "models.yaml"
