"""Who may call: gateway API keys (constant-time compare) and per-key rate limits."""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

from .config import ApiKey, Config
from .errors import RateLimited, Unauthorized


class Bucket:
    """A token bucket: `rpm` requests a minute, bursts of up to `rpm`."""

    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, rpm: int) -> None:
        self.rate = rpm / 60.0
        self.capacity = float(rpm)
        self.tokens = float(rpm)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Guard:
    """Checks a request's key and rate; returns the key id for logs and metrics."""

    def __init__(self, config: Config) -> None:
        self.keys: tuple[ApiKey, ...] = config.api_keys
        self._secrets = [(k, k.secret.reveal().encode()) for k in self.keys]
        self.default_rpm = config.server.rate_limit_rpm
        self._buckets: dict[str, Bucket] = {}
        self.open = not self.keys and not self.default_rpm  # nothing to check

    def inherit(self, previous: Guard) -> None:
        """Keep the rate-limit state of keys that survive a reload."""
        self._buckets = previous._buckets

    def check(self, headers: Mapping[str, str], client: str) -> str:
        key = self._authenticate(headers) if self.keys else None
        key_id = key.id if key else ""
        rpm = key.rate_limit_rpm if key else self.default_rpm
        if rpm:
            bucket_id = key_id or f"addr:{client}"
            bucket = self._buckets.get(bucket_id)
            if bucket is None or bucket.capacity != rpm:
                bucket = self._buckets[bucket_id] = Bucket(rpm)
            wait = bucket.take()
            if wait:
                raise RateLimited(
                    f"Rate limit of {rpm} requests per minute reached; retry in {wait:.1f}s.",
                    headers={"retry-after": str(max(1, round(wait + 0.5)))},
                )
        return key_id

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
