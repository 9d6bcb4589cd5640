"""The Python API (the seed's router) on the gateway's Engine, against fake upstreams on sockets.

The tiers' aliases point at the fake OpenAI upstream: `ollama` is a dead port (refused),
`huggingface` and `openrouter` are the fake (by URL tag), `keyless` has no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import (
    LLMError,
    LLMModelTier,
    LLMProvider,
    LLMResponse,
    LLMRouter,
    get_llm_router,
    invoke_llm_sync,
)

from .fake_openai import FakeOpenAI
from .servers import refused_port, settle

ROOT = Path(__file__).resolve().parents[1]
NO_BREAKER = "breaker: {failures: 1000000, max_cooldown: 0.001}"


def _config(fake_url: str) -> str:
    return f"""
server: {{request_timeout: 10, audit_log: off}}
providers:
  ollama:
    type: openai
    base_url: http://127.0.0.1:{refused_port()}/v1
    connect_timeout: 1
    {NO_BREAKER}
  huggingface:
    type: openai
    base_url: {fake_url}/router-hf/v1
    timeout: 5
    {NO_BREAKER}
  openrouter:
    type: openai
    base_url: {fake_url}/router-or/v1
    api_key: sk-router-test
    {NO_BREAKER}
  keyless:
    type: openai
    base_url: {fake_url}/router-keyless/v1
    api_key: ${{OMNIMIND_TEST_UNSET_KEY:-}}
models:
  omnimind-fast:
    - {{provider: ollama, model: "qwen2:1.5b-instruct"}}
    - {{provider: huggingface, model: echo}}
    - {{provider: openrouter, model: echo}}
  omnimind-balanced:
    - {{provider: ollama, model: "qwen2:7b-instruct"}}
    - {{provider: huggingface, model: echo}}
  omnimind-hq:
    - {{provider: openrouter, model: echo}}
    - {{provider: huggingface, model: echo}}
  all-fail:
    - {{provider: huggingface, model: status-500}}
    - {{provider: ollama, model: x}}
    - {{provider: keyless, model: x}}
  rejects:
    - {{provider: huggingface, model: status-400}}
    - {{provider: openrouter, model: echo}}
  mid-fail:
    - {{provider: huggingface, model: error-mid}}
  drip:
    - {{provider: huggingface, model: drip-200-20}}
  hang:
    - {{provider: huggingface, model: hang}}
"""


# The seed's example, as its README had it, around one `asyncio.run`; only the import changed.
SEED_EXAMPLE = """
import asyncio

from proxy import get_llm_router, LLMModelTier, LLMProvider, LLMResponse, invoke_llm_sync

async def main():
    router = get_llm_router()
    resp = await router.invoke("What is 2+2?", tier=LLMModelTier.BALANCED, preferred_provider=None)
    print(resp.success, resp.text, resp.provider, resp.tokens_used)
    print(router.get_provider_status())

asyncio.run(main())
text = invoke_llm_sync("Hello", tier=LLMModelTier.FAST)
print(isinstance(text, LLMResponse), text.success, text.text)
"""


def _seed_config(fake_url: str) -> str:
    return f"""
server: {{audit_log: off}}
providers:
  ollama: {{type: openai, base_url: "{fake_url}/seed-ollama/v1"}}
  huggingface: {{type: openai, base_url: "{fake_url}/seed-hf/v1"}}
  openrouter:
    type: openai
    base_url: {fake_url}/seed-or/v1
    api_key: ${{OMNIMIND_TEST_UNSET_KEY:-}}
models:
  omnimind-fast: [{{provider: ollama, model: echo}}, {{provider: openrouter, model: echo}}]
  omnimind-balanced: [{{provider: openrouter, model: echo}}, {{provider: huggingface, model: echo}}]
  omnimind-hq: [{{provider: huggingface, model: echo}}]
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, fake_url: str) -> Path:
    path = tmp_path_factory.mktemp("router") / "models.yaml"
    path.write_text(textwrap.dedent(_config(fake_url)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def router(config_path: Path) -> Iterator[LLMRouter]:
    with LLMRouter(config_path) as r:
        yield r


@pytest.fixture
def default_router(config_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LLMRouter]:
    """The process-wide router for $OMNIMIND_CONFIG, as `invoke_llm_sync` finds it."""
    monkeypatch.setenv("OMNIMIND_CONFIG", str(config_path))
    r = get_llm_router()
    yield r
    r.close()


def _reasons(resp: LLMResponse) -> list[str]:
    return [a.reason for a in resp.attempts]


# ---- invoke ------------------------------------------------------------------------------


async def test_invoke_a_tier_falls_back_to_an_answer(router: LLMRouter) -> None:
    resp = await router.invoke("What is 2+2?", tier=LLMModelTier.FAST)
    assert resp.success and resp.error is None
    assert resp.text == "echo: What is 2+2?"
    assert resp.provider == LLMProvider.HUGGINGFACE and resp.model == "echo"
    assert resp.latency_ms > 0
    assert resp.tokens_used == 7  # the fake counts words: 3 in, 4 out
    assert resp.fallbacks == ["ollama:connect_error"]


async def test_tier_as_alias_or_name_and_params_forwarded(
    router: LLMRouter, fake: FakeOpenAI
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
    ]
    for tier in ("omnimind-hq", "HIGH_QUALITY", "high_quality"):
        resp = await router.invoke(messages, tier=tier, temperature=0.2, max_tokens=5, seed=3)
        assert resp.success and resp.text == "echo: hello there"
        assert resp.provider == "openrouter" and resp.attempts == []
        sent = fake.calls("router-or")[-1]
        assert sent.body["messages"] == messages and sent.body["model"] == "echo"
        assert (sent.body["temperature"], sent.body["max_tokens"], sent.body["seed"]) == (0.2, 5, 3)
        assert sent.body["stream"] is False
        assert sent.headers["authorization"] == "Bearer sk-router-test"


async def test_preferred_provider_goes_first(router: LLMRouter, fake: FakeOpenAI) -> None:
    before = len(fake.calls("router-or"))
    resp = await router.invoke(
        "hi", tier=LLMModelTier.HIGH_QUALITY, preferred_provider=LLMProvider.HUGGINGFACE
    )
    assert resp.provider == "huggingface" and resp.attempts == []
    assert len(fake.calls("router-or")) == before  # the chain's first entry was never called
    resp = await router.invoke("hi", tier=LLMModelTier.FAST, preferred_provider="openrouter")
    assert resp.provider == "openrouter" and resp.attempts == []  # the dead ollama not tried


async def test_all_fail_is_a_structured_failure(router: LLMRouter) -> None:
    resp = await router.invoke("hi", tier="all-fail")
    assert not resp.success and resp.text == "" and resp.provider == ""
    assert _reasons(resp) == ["server_error", "connect_error", "unavailable"]
    assert resp.error is not None
    error = resp.error
    positions = [
        error.index("huggingface (status-500): server_error 500 - fake upstream says 500"),
        error.index("ollama (x): connect_error"),
        error.index("keyless (x): unavailable"),
    ]
    assert positions == sorted(positions)  # every attempt, in chain order
    assert "sk-router-test" not in error


async def test_upstream_rejection_is_a_structured_failure(router: LLMRouter) -> None:
    resp = await router.invoke("hi", tier="rejects")
    assert not resp.success
    assert resp.error == "The upstream rejected the request (400): fake upstream says 400"


async def test_invalid_arguments_raise(router: LLMRouter) -> None:
    with pytest.raises(ValueError, match="Unknown tier or model alias 'nope'"):
        await router.invoke("hi", tier="nope")
    with pytest.raises(ValueError, match="Unknown provider 'vllm'"):
        await router.invoke("hi", preferred_provider="vllm")
    with pytest.raises(ValueError, match="model cannot be given"):
        await router.invoke("hi", model="x")
    with pytest.raises(TypeError, match="prompt must be"):
        await router.invoke(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown tier"):
        router.stream("hi", tier="nope")  # checked before the first delta is asked for


async def test_cancelling_the_caller_cancels_the_upstream_call(
    router: LLMRouter, fake: FakeOpenAI
) -> None:
    before = fake.active
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(router.invoke("hi", tier="hang"), 0.3)
    assert settle(lambda: fake.active, before) == before  # the hanging request was dropped


# ---- stream ------------------------------------------------------------------------------


async def test_stream_yields_text_deltas(router: LLMRouter) -> None:
    deltas = [d async for d in router.stream("What is 2+2?", tier=LLMModelTier.FAST)]
    assert deltas == ["echo:", " What", " is", " 2+2?"]


async def test_stream_that_cannot_start_raises_llm_error(router: LLMRouter) -> None:
    with pytest.raises(LLMError) as err:
        async for _ in router.stream("hi", tier="all-fail"):
            pass
    assert [a.reason for a in err.value.attempts] == [
        "server_error",
        "connect_error",
        "unavailable",
    ]
    assert "All providers for 'all-fail' failed" in str(err.value)


async def test_stream_failing_mid_way_raises_with_partial_text(router: LLMRouter) -> None:
    got: list[str] = []
    with pytest.raises(LLMError, match="failed after it started") as err:
        async for delta in router.stream("hello there", tier="mid-fail"):
            got.append(delta)
    assert got == ["echo:"]
    assert err.value.response.text == "echo:" and err.value.response.provider == "huggingface"


async def test_closing_a_stream_early_closes_the_upstream(
    router: LLMRouter, fake: FakeOpenAI
) -> None:
    before = fake.active
    async with contextlib.aclosing(router.stream("hi", tier="drip")) as deltas:
        async for delta in deltas:
            assert delta == "0 "
            break
    assert settle(lambda: fake.active, before) == before  # 200 chunks would take 4 s


# ---- status and counters -----------------------------------------------------------------


def test_provider_status(router: LLMRouter) -> None:
    assert router.get_provider_status() == {
        "ollama": False,  # refused when last tried: not available now (its breaker is closed)
        "huggingface": True,
        "openrouter": True,
        "keyless": False,  # no api key
    }


async def test_metrics_count_requests_successes_and_fallbacks(config_path: Path) -> None:
    async with LLMRouter(config_path) as own:  # counters are per router
        assert own.get_metrics() == {
            "requests_total": 0,
            "requests_success": 0,
            "fallback_used": 0,
            "latency_by_provider": {},
        }
        await own.invoke("hi", tier=LLMModelTier.HIGH_QUALITY)  # first entry answers
        await own.invoke("hi", tier=LLMModelTier.FAST)  # falls back
        await own.invoke("hi", tier="all-fail")
        metrics = own.get_metrics()
    assert metrics["requests_total"] == 3
    assert metrics["requests_success"] == 2
    assert metrics["fallback_used"] == 1
    assert set(metrics["latency_by_provider"]) == {"openrouter", "huggingface"}
    assert all(ms > 0 for ms in metrics["latency_by_provider"].values())


# ---- sync callers and event loops --------------------------------------------------------


def test_invoke_llm_sync_from_plain_code(default_router: LLMRouter) -> None:
    resp = invoke_llm_sync("Hello", tier=LLMModelTier.FAST)
    assert isinstance(resp, LLMResponse)
    assert resp.success and resp.text == "echo: Hello" and resp.provider == "huggingface"
    assert get_llm_router() is default_router  # one router per config file, process-wide
    assert get_llm_router(os.environ["OMNIMIND_CONFIG"]) is default_router


async def test_invoke_llm_sync_from_threads_while_a_loop_runs(default_router: LLMRouter) -> None:
    """Worker threads block on the router's loop; this test's own loop keeps running."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    try:
        answers = await asyncio.gather(
            *(asyncio.to_thread(invoke_llm_sync, f"n{i}", LLMModelTier.FAST) for i in range(8))
        )
    finally:
        ticker.cancel()
    assert [a.text for a in answers] == [f"echo: n{i}" for i in range(8)]
    assert ticks > 0
    # Called on this loop's own thread it still works (blocking this loop meanwhile).
    assert invoke_llm_sync("inline", tier=LLMModelTier.FAST).text == "echo: inline"


def test_await_from_several_event_loops(router: LLMRouter) -> None:
    async def ask(text: str) -> str:
        return (await router.invoke(text, tier=LLMModelTier.HIGH_QUALITY)).text

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(asyncio.run(ask(f"loop {i}"))))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [f"echo: loop {i}" for i in range(4)]
    assert asyncio.run(ask("again")) == "echo: again"  # a loop that is gone left nothing behind


def test_blocking_on_the_routers_own_loop_raises(router: LLMRouter) -> None:
    async def blocking_call() -> LLMResponse:
        return router.invoke_sync("hi", tier=LLMModelTier.FAST)

    future = asyncio.run_coroutine_threadsafe(blocking_call(), router.loop)
    with pytest.raises(RuntimeError, match="own event loop thread"):
        future.result(10)


def test_a_closed_router_refuses_and_the_factory_replaces_it(config_path: Path) -> None:
    first = get_llm_router(config_path)
    first.close()
    first.close()  # idempotent
    assert first.closed
    with pytest.raises(RuntimeError, match="closed"):
        first.invoke_sync("hi")
    second = get_llm_router(config_path)
    try:
        assert second is not first and second.invoke_sync("hi").success
    finally:
        second.close()


def test_the_seeds_example_runs_unchanged(tmp_path: Path, fake_url: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(_seed_config(fake_url)), encoding="utf-8")
    env = {**os.environ, "OMNIMIND_CONFIG": str(path), "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-c", SEED_EXAMPLE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "True echo: What is 2+2? huggingface 7",
        "{'ollama': True, 'huggingface': True, 'openrouter': False}",
        "True True echo: Hello",
    ]
    assert done.stderr == ""  # no warning, no unclosed session at interpreter exit


def test_router_follows_edits_to_models_yaml(
    tmp_path: Path, fake_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Retiering is editing models.yaml, for the in-process router as for the server."""
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(_config(fake_url)), encoding="utf-8")
    with LLMRouter(path) as router:
        assert router.invoke_sync("hi", tier="omnimind-hq").provider == "openrouter"
        # the watcher: hq now starts with huggingface, and a new alias appears
        edited = _config(fake_url).replace(
            "  omnimind-hq:\n    - {provider: openrouter, model: echo}\n",
            "  omnimind-hq:\n    - {provider: huggingface, model: echo}\n"
            "  added:\n    - {provider: openrouter, model: echo}\n",
        )
        path.write_text(textwrap.dedent(edited), encoding="utf-8")
        deadline = time.monotonic() + 5
        while "added" not in router.config.models and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "added" in router.config.models
        assert router.invoke_sync("hi", tier="omnimind-hq").provider == "huggingface"
        assert router.invoke_sync("hi", tier="added").success
        # an invalid edit: rejected, the last good config keeps serving
        caplog.set_level(logging.ERROR, logger="omnimind.gateway")
        path.write_text("providers: {x: {type: nope}}\nmodels: {}\n", encoding="utf-8")
        assert not router.reload()
        assert any("reload rejected" in r.getMessage() for r in caplog.records)
        assert router.invoke_sync("hi", tier="added").success
        # explicitly, without waiting for the watcher
        path.write_text(textwrap.dedent(_config(fake_url)), encoding="utf-8")
        assert router.reload() and "added" not in router.config.models
