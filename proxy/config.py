"""models.yaml in two stages.

1. `parse()` decodes the YAML into msgspec Structs: the file's exact shape, unknown keys
   forbidden, providers a tagged union on `type`.
2. `load()` checks references between sections and resolves `${VAR}` / `${VAR:-default}`
   in exactly one place (`_expand`); secrets become `Secret`, masked in every repr.
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

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


class BaseProviderSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type"):
    """What every provider type accepts; each provider module subclasses it with its tag."""

    timeout: PositiveFloat = 60.0
    connect_timeout: PositiveFloat = 5.0
    first_token_timeout: PositiveFloat = 30.0
    max_concurrency: PositiveInt | None = None
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 128
    retries: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0  # same-provider retries, jittered
    retry_backoff: PositiveFloat = 0.25
    health_check_interval: PositiveFloat | None = None  # probe while idle, seconds
    breaker: BreakerSpec = msgspec.field(default_factory=BreakerSpec)

    def problem(self) -> tuple[str, str] | None:
        """(key, message) if the values do not fit together."""
        return None

    def context_window(self, entry: EntrySpec) -> int | None:
        """The window this provider knows for an entry (e.g. Ollama's num_ctx option)."""
        return None

    loads_gguf: ClassVar[bool] = False  # entries may name a `gguf_file`


class EntrySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    provider: str
    model: str
    timeout: PositiveFloat | None = None
    connect_timeout: PositiveFloat | None = None
    first_token_timeout: PositiveFloat | None = None
    gguf_file: str | None = None
    input_cost_per_mtok: NonNegativeFloat | None = None
    output_cost_per_mtok: NonNegativeFloat | None = None
    context_window: PositiveInt | None = None  # tokens: prompt + max_tokens must fit
    max_tokens: PositiveInt | None = None  # default answer budget where the upstream needs one
    kind: Literal["chat", "embedding"] | None = None  # what this entry's model does
    truncate: bool = False  # embeddings: cut inputs longer than the window instead of a 400


class CacheSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The exact response cache (proxy/cache.py): on an alias, or for all in `server.cache`."""

    ttl: PositiveFloat = 300.0  # seconds
    max_entries: PositiveInt = 10_000


class AliasSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The long form of an alias: its chain plus alias-level options."""

    chain: list[EntrySpec]
    hedge_after_ms: PositiveInt | None = None  # start the next entry too if no first chunk yet
    kind: Literal["chat", "embedding"] | None = None  # else inferred from the entries
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
    # Bounds and browser rules (proxy/edge.py, proxy/httpproto.py, proxy/audit.py)
    cors_origins: list[str] = []  # browser origins allowed in (CORS); "*" for any
    allowed_hosts: list[str] = []  # without api_keys: Host names served besides localhost
    trusted_proxies: list[str] = []  # CIDRs whose X-Forwarded-For is believed
    max_header_bytes: PositiveInt = 65536  # request line + headers; past it: 431
    max_headers: PositiveInt = 100
    header_timeout: PositiveFloat = 10.0  # a request's headers must arrive within it
    body_timeout: PositiveFloat = 60.0  # ...and its body within this after the headers
    keep_alive_timeout: PositiveFloat = 5.0  # idle keep-alive connections are closed
    max_connections: PositiveInt = 2048  # more concurrent connections/requests: 503
    max_json_depth: PositiveInt = 64  # deeper request JSON: 400
    audit_buffer: PositiveInt = 10000  # audit lines waiting for the writer; more are dropped
    state: StateSpec = msgspec.field(default_factory=StateSpec)
    cache: CacheSpec | None = None  # every alias (an alias's own `cache` wins)


class ConfigSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    providers: dict[str, BaseProviderSpec]
    models: dict[str, list[EntrySpec] | AliasSpec]
    server: ServerSpec = msgspec.field(default_factory=ServerSpec)


# ---- stage 2: runtime objects ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    spec: Any  # a BaseProviderSpec subclass: strings expanded, `api_key` moved out
    api_key: Secret | None = None
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # values may be keys
    unavailable: str | None = None  # why this provider cannot be used, if it cannot
    secrets: tuple[str, ...] = field(default=(), repr=False)  # api_key and header values

    @property
    def type(self) -> str:
        return str(type(self.spec).__struct_config__.tag)


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
    context_window: int | None = None
    max_tokens: int | None = None
    truncate: bool = False

    @property
    def deployment(self) -> str:
        return f"{self.provider}/{self.model}"


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
    kinds: dict[str, str] = field(default_factory=dict)  # alias -> "chat" | "embedding"
    caches: dict[str, CacheSpec] = field(default_factory=dict)  # alias -> its response cache

    def secrets(self) -> list[str]:
        """Every configured credential, for the one redaction of outgoing text."""
        found = [s for p in self.providers.values() for s in p.secrets]
        found += [k.secret.reveal() for k in self.api_keys]
        found.append(urlsplit(self.server.state.url).password or "")  # redis://:pw@host
        return [s for s in dict.fromkeys(found) if s]


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
    from .providers import spec_union  # provider modules import this one

    union = spec_union()
    return ConfigSpec(
        providers={
            str(k): _provider_spec(v, union, f"providers.{k}", path) for k, v in providers.items()
        },
        models={
            str(k): _convert(v, list[EntrySpec] | AliasSpec, f"models.{k}", path)
            for k, v in models.items()
        },
        server=_convert(raw.get("server") or {}, ServerSpec, "server", path),
    )


def _provider_spec(value: Any, union: Any, where: str, path: str) -> Any:
    if isinstance(value, dict) and "type" not in value:
        raise ConfigError(f"{path}: at {where}.type: missing; one of {_tags(union)}")
    if isinstance(value, dict) and str(value.get("type")) not in _tags(union).split(", "):
        raise ConfigError(
            f"{path}: at {where}.type: unknown provider type {value.get('type')!r}; "
            f"one of {_tags(union)}"
        )
    return _convert(value, union, where, path)


def _tags(union: Any) -> str:
    return ", ".join(sorted(str(t.__struct_config__.tag) for t in typing.get_args(union)))


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
    kinds: dict[str, str] = {}
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
        declared = value.kind if isinstance(value, AliasSpec) else None
        kinds[alias] = _kind(alias, declared, entries, path)
        models[alias] = tuple(
            _entry(e, providers, f"models.{alias}[{i}]", path) for i, e in enumerate(entries)
        )
    keys = _api_keys(spec.server, missing, path)
    state = spec.server.state
    server = msgspec.structs.replace(
        spec.server, state=msgspec.structs.replace(state, url=_expand(state.url, missing))
    )
    missing_env = tuple(dict.fromkeys(missing))
    return Config(path, providers, models, server, missing_env, hedges, keys, kinds, caches)


def _kind(alias: str, declared: str | None, entries: list[EntrySpec], path: str) -> str:
    """An alias serves chat or embeddings: declared, or said by its entries; never both."""
    said: set[str] = {e.kind for e in entries if e.kind is not None}
    if declared is not None:
        said.add(declared)
    if len(said) > 1:
        raise ConfigError(
            f"{path}: at models.{alias}: mixes chat and embedding entries; an alias serves "
            "one kind (split it into two aliases)"
        )
    return said.pop() if said else "chat"


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


def _provider(name: str, spec: Any, missing: list[str], path: str) -> ProviderConfig:
    """Expand `${VAR}` in a provider's strings; its api_key and header values are secrets."""
    key: Secret | None = None
    unavailable = None
    changes: dict[str, Any] = {}
    headers = {k: _expand(v, missing) for k, v in getattr(spec, "headers", {}).items()}
    base_url = getattr(spec, "base_url", None)
    if isinstance(base_url, str):
        base_url = _expand(base_url, missing).rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"{path}: at providers.{name}.base_url: expected an http(s) URL, got {base_url!r}"
            )
        changes["base_url"] = base_url
    api_key = getattr(spec, "api_key", None)
    if isinstance(api_key, str):
        key = Secret(_expand(api_key, missing))
        changes["api_key"] = None
        if not key:
            names = [m.group(1) for m in _VAR.finditer(api_key)]
            unavailable = f"{' or '.join(names)} is not set" if names else "api_key is empty"
    problem = spec.problem()
    if problem is not None:
        raise ConfigError(f"{path}: at providers.{name}.{problem[0]}: {problem[1]}")
    if changes:
        spec = msgspec.structs.replace(spec, **changes)
    secrets = tuple(v for v in [key.reveal() if key else "", *headers.values()] if v)
    return ProviderConfig(name, spec, key, headers, unavailable, secrets)


def _entry(e: EntrySpec, providers: dict[str, ProviderConfig], where: str, path: str) -> Entry:
    provider = providers.get(e.provider)
    if provider is None:
        known = ", ".join(sorted(providers)) or "none"
        raise ConfigError(
            f"{path}: at {where}.provider: unknown provider '{e.provider}' (defined: {known})"
        )
    p = provider.spec
    if e.gguf_file is not None and not p.loads_gguf:
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
        context_window=e.context_window or p.context_window(e),
        max_tokens=e.max_tokens,
        truncate=e.truncate,
    )


def default_path() -> str:
    return os.environ.get("OMNIMIND_CONFIG") or "models.yaml"
