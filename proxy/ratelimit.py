"""Rate limits as token buckets over one minute, and their OpenAI-style headers.

A key with `rate_limit_rpm: N` holds a bucket of N requests that refills continuously
at N per minute (a burst of N, then one every 60/N s); `rate_limit_tpm: T` holds a bucket of
T tokens that refills the same way. A request is admitted while the request bucket holds a
whole request and the token bucket is not empty; the tokens are charged when the answer's
usage is known, so one request can take the token bucket below zero (a debt, bounded to one
minute's worth) and the next waits until it is paid.

The math here is pure (the clock is an argument): `state.memory` uses it as is, and the Lua
script in `state.scripts` is the same math run inside Redis, on Redis's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

WINDOW_S = 60.0


@dataclass(slots=True)
class Bucket:
    level: float
    stamp: float  # seconds, on the caller's clock

    def refill(self, limit: int, now: float) -> float:
        self.level = min(float(limit), self.level + (now - self.stamp) * limit / WINDOW_S)
        self.stamp = now
        return self.level


def full(limit: int, now: float) -> Bucket:
    return Bucket(float(limit), now)


class Quota(msgspec.Struct, frozen=True):
    """One limit's standing after a request: what the `x-ratelimit-*` headers say."""

    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again


def quota(limit: int, level: float) -> Quota:
    return Quota(limit, max(0, int(level)), max(0.0, (limit - level) * WINDOW_S / limit))


def wait_for(limit: int, level: float) -> float:
    """Seconds until a bucket at `level` holds one whole unit again (0 if it does now)."""
    return 0.0 if level >= 1 else (1 - level) * WINDOW_S / limit


def charge(bucket: Bucket, limit: int, tokens: int, now: float) -> None:
    """Take a finished request's tokens; the debt is bounded to one minute's refill."""
    bucket.refill(limit, now)
    bucket.level = max(-float(limit), bucket.level - tokens)


def duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '6s', '1m30s'."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def headers(requests: Quota | None, tokens: Quota | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, q in (("requests", requests), ("tokens", tokens)):
        if q is not None:
            out[f"x-ratelimit-limit-{name}"] = str(q.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(q.remaining)
            out[f"x-ratelimit-reset-{name}"] = duration(q.reset)
    return out


def retry_after(seconds: float) -> str:
    """A whole number of seconds, never 0 (clients read 0 as 'now')."""
    return str(max(1, int(seconds + 0.999)))
