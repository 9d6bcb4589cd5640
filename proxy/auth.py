"""Who may call, and how often: gateway API keys and per-key request/token limits.

A request meets the guard twice around its upstream call:

    caller = guard.identify(headers, client)      # sync, no I/O: 401 at once if the key is wrong
    ...read and parse the body, pick the alias's chain...
    admission = await guard.admit(caller, health_ids=..., cache_key=...)
        # ONE state round trip: 429 (Retry-After, x-ratelimit-*) if over a limit; else
        # the limits' headers, cooldowns other instances published, the cached answer
    ...the chain (skipping what is cooling), or `admission.cached`...
    guard.settle(admission, Outcome(...))         # ONE round trip (batched), not awaited

`state.flow` does this for the chain routes (`routes_chat.serve`); the pipeline does
identify + admit (limits only) for every other route.

Limits, cooldowns, usage and the cache live in the state store (`proxy/state/`): this
process's memory, or Redis shared by every worker and instance (`server.state`).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Mapping, Sequence

import msgspec

from .config import ApiKey, Config, StateSpec
from .errors import RateLimited, Unauthorized
from .state import Before, Cooldown, Outcome, StateStore, open_store


class Caller(msgspec.Struct, frozen=True):
    key_id: str  # "" when the gateway has no keys
    bucket: str  # what the limits count against: the key id, or "addr:<client address>"
    rpm: int | None
    tpm: int | None


class Admission(msgspec.Struct):
    caller: Caller
    headers: dict[str, str] = msgspec.field(default_factory=dict)  # x-ratelimit-*, for the answer
    cooling: dict[str, Cooldown] = msgspec.field(default_factory=dict)  # health id -> cooldown
    cached: bytes | None = None
    cache_key: str | None = None
    degraded: bool = False


class Guard:
    """Checks keys and limits against `store`; one per config, the store outlives reloads."""

    def __init__(self, config: Config, store: StateStore | None = None) -> None:
        self.keys: tuple[ApiKey, ...] = config.api_keys
        self._secrets = [(k, k.secret.reveal().encode()) for k in self.keys]
        self.default_rpm = config.server.rate_limit_rpm
        self.default_tpm = config.server.rate_limit_tpm
        self.state_spec: StateSpec = config.server.state
        self.store: StateStore = store or open_store(self.state_spec)
        self._retired: set[asyncio.Task[None]] = set()
        self.open = not self.keys and not self.default_rpm and not self.default_tpm

    def inherit(self, previous: Guard) -> None:
        """Keep the state (limits, cooldowns, cache) when a reload leaves `server.state` as is."""
        if previous.state_spec == self.state_spec:
            mine, self.store = self.store, previous.store
            if mine is not previous.store:
                self._close_later(mine)
        else:
            self._close_later(previous.store)

    def _close_later(self, store: StateStore) -> None:
        try:
            task = asyncio.get_running_loop().create_task(store.aclose())
        except RuntimeError:  # no loop: nothing was opened on one
            return
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def watch(self, on_degraded: Callable[[bool], None]) -> None:
        """Be told when the shared state becomes unreachable (True) and is back (False)."""
        if hasattr(self.store, "on_degraded"):
            self.store.on_degraded = on_degraded
        on_degraded(self.store.degraded)

    def identify(self, headers: Mapping[str, str], client: str) -> Caller:
        """The caller's key (401 if missing or wrong) and limits; no I/O."""
        if not self.keys:
            rpm, tpm = self.default_rpm, self.default_tpm
            return Caller("", f"addr:{client}", rpm, tpm)
        key = self._authenticate(headers)
        return Caller(key.id, key.id, key.rate_limit_rpm, key.rate_limit_tpm)

    async def admit(
        self,
        caller: Caller,
        *,
        health_ids: Sequence[str] = (),
        cache_key: str | None = None,
        limits: bool = True,
    ) -> Admission:
        """429 (RateLimited, with Retry-After and x-ratelimit-*) if over a limit.
        `limits=False`: already admitted (by the pipeline); health and cache only."""
        rpm, tpm = (caller.rpm, caller.tpm) if limits else (None, None)
        if not (rpm or tpm or health_ids or cache_key):
            return Admission(caller)
        before = await self.store.before(
            caller.bucket, rpm=rpm, tpm=tpm, health_ids=health_ids, cache_key=cache_key
        )
        if not before.admitted:
            raise RateLimited(_refusal(caller, before), headers=before.headers())
        return Admission(
            caller, before.headers(), before.cooling, before.cached, cache_key, before.degraded
        )

    def settle(self, admission: Admission, outcome: Outcome) -> None:
        """Record a finished request: tokens charged, usage, health events, cache entry.
        The answer does not wait for it (the Redis store writes it with others, in a batch)."""
        outcome.key_id = admission.caller.bucket  # usage is kept for keys, not addresses
        outcome.tpm = admission.caller.tpm
        self.store.after(outcome)

    async def aclose(self) -> None:
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)
        await self.store.aclose()

    def _authenticate(self, headers: Mapping[str, str]) -> ApiKey:
        given = headers.get("x-api-key", "")
        if not given:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not given:
            raise Unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
            )
        candidate = given.encode()
        found = None
        for key, secret in self._secrets:  # compare with every key: no early exit
            if hmac.compare_digest(candidate, secret):
                found = key
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return found


def _refusal(caller: Caller, before: Before) -> str:
    if before.degraded:
        return (
            "Rate limits cannot be checked while the shared state is unreachable "
            f"(server.state.on_error: closed); retry in {before.retry_after:.1f}s."
        )
    tokens = before.tokens
    if tokens is not None and tokens.remaining == 0 and caller.tpm:
        return (
            f"Rate limit of {caller.tpm} tokens per minute reached; "
            f"retry in {before.retry_after:.1f}s."
        )
    return (
        f"Rate limit of {caller.rpm} requests per minute reached; "
        f"retry in {before.retry_after:.1f}s."
    )
