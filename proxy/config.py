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
from typing import Any
from urllib.parse import urlsplit

import msgspec
import yaml

from .spec import (
    AliasSpec,
    BaseProviderSpec,
    BreakerSpec,
    CacheSpec,
    ConfigSpec,
    EntrySpec,
    KeySpec,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ServerSpec,
    StateSpec,
)
from .upstream import encode_headers

__all__ = [  # stage 1 is re-exported: providers and tests import it from here
    "AliasSpec",
    "ApiKey",
    "BaseProviderSpec",
    "BreakerSpec",
    "CacheSpec",
    "Config",
    "ConfigError",
    "ConfigSpec",
    "Entry",
    "EntrySpec",
    "KeySpec",
    "NonNegativeFloat",
    "PositiveFloat",
    "PositiveInt",
    "ProviderConfig",
    "Secret",
    "ServerSpec",
    "StateSpec",
    "build",
    "default_path",
    "load",
    "parse",
]


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
    kind: str = "chat"  # the alias's: "chat" or "embedding"

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
            _entry(e, providers, f"models.{alias}[{i}]", path, kinds[alias])
            for i, e in enumerate(entries)
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
    try:  # a line break would start a header of its own: refused here, not per request
        encode_headers(headers)
    except ValueError as exc:  # it names the header, never its value
        raise ConfigError(f"{path}: at providers.{name}.headers: {exc}") from None
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


def _entry(
    e: EntrySpec, providers: dict[str, ProviderConfig], where: str, path: str, kind: str = "chat"
) -> Entry:
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
        kind=kind,
    )


def default_path() -> str:
    return os.environ.get("OMNIMIND_CONFIG") or "models.yaml"
