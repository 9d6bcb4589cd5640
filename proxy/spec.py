"""models.yaml, stage 1: the file's exact shape as msgspec Structs (see config.py).

Unknown keys are forbidden everywhere; providers are a tagged union on `type`, each
provider module contributing its own Struct (a `BaseProviderSpec`).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


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
