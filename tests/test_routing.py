"""Routing rules (issue 14), each through a real gateway with the official `openai` client.

Each rule gets providers of its own in one gateway (so the tests share no breaker state):
health per deployment and per provider, which upstream answers fall back, context
windows, waiting for a slot, first-token timeouts, failures after the first chunk, the
real-time status, and what an all-failed or rejected request tells and records.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy import get_llm_router
from proxy.errors import EXCERPT
from proxy.reasons import Reason

from . import schemas
from .conftest import GatewayFactory
from .fake_openai import FakeOpenAI
from .helpers import (
    NO_BREAKER,
    USER,
    Config,
    audit_line,
    chat,
    entry,
    metric,
    openai_provider,
    provider_state,
    sse_data,
    start,
    wait_for,
    write_config,
)
from .servers import UvicornServer, refused_port

LONG_PROMPT: list[Any] = [{"role": "user", "content": "x" * 600}]  # about 200 tokens
EJECT_TWICE: dict[str, float] = {"failures": 2, "cooldown": 30}
CANARY = "sk-routing-canary-5f4e3d2c"


def _config(url: str, audit: Path) -> Config:
    def fake(tag: str, **options: Any) -> Config:
        return openai_provider(url, tag, **{"breaker": NO_BREAKER, **options})

    def dead(**options: Any) -> Config:
        return {"type": "openai", "base_url": f"http://127.0.0.1:{refused_port()}/v1",
                "connect_timeout": 1, **options}  # fmt: skip

    backup = entry("backup", "echo")
    return {
        "server": {"request_timeout": 8, "audit_log": str(audit)},
        "providers": {
            "backup": fake("backup"),
            "shared": fake("shared", breaker={"failures": 1_000_000}),
            "refused": dead(breaker=EJECT_TWICE),
            "down": dead(breaker=NO_BREAKER),
            "probed": dead(breaker=NO_BREAKER, health_check_interval=0.1),
            "pay": fake("pay"),
            "gone": fake("gone"),
            "ctx": fake("ctx"),
            "small": fake("small"),
            "large": fake("large"),
            "narrow": fake("narrow", max_concurrency=1, timeout=2.5),  # answers take 2 s
            "coldstart": fake("coldstart", timeout=1, first_token_timeout=3),
            "midway": fake("midway", breaker=EJECT_TWICE),
            "excerpt": fake("excerpt"),
            "leaky": fake("leaky", api_key=CANARY),
            "rejecting": fake("rejecting"),
            "burst": fake(
                "burst",
                timeout=1.5,
                first_token_timeout=1.5,
                breaker={"failures": 3, "cooldown": 30},
            ),  # fmt: skip
        },
        "models": {
            "cool-a": [entry("shared", "status-429"), backup],
            "cool-b": [entry("shared", "echo")],
            "refused-a": [entry("refused", "a"), backup],
            "refused-b": [entry("refused", "b"), backup],
            "down": [entry("down", "x"), backup],
            "probed": [entry("probed", "x"), backup],
            "pay": [entry("pay", "status-402"), backup],
            "gone": [entry("gone", "status-410"), backup],
            "ctx-400": [entry("ctx", "context-length"), backup],
            "window": [
                entry("small", "echo", context_window=50),
                entry("large", "echo", context_window=100_000),
            ],
            "window-none": [
                entry("small", "echo", context_window=50),
                entry("large", "echo", context_window=120),
                entry("large", "echo", context_window=90),
            ],
            "narrow": [entry("narrow", "slow-2000")],
            "coldstart": [entry("coldstart", "slow-first-1500")],
            "midway": [entry("midway", "error-mid"), backup],
            "excerpt": [entry("excerpt", "llamacpp-500")],
            "leaky": [entry("leaky", "status-401")],  # the fake echoes the key it got
            "rejecting": [entry("rejecting", "status-400"), backup],
            "burst": [entry("burst", "hang"), backup],
        },
    }


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, fake_url: str, audit: Path) -> UvicornServer:
    return start(start_gateway, _config(fake_url, audit))


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def http(gw: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


def _raw(client: openai.OpenAI, model: str, **fields: Any) -> Any:
    fields.setdefault("messages", USER)
    return client.chat.completions.with_raw_response.create(model=model, **fields)


def _said(err: openai.APIStatusError) -> str:
    """The error's own message (the SDK's `message` adds "Error code: N - {...}")."""
    assert isinstance(err.body, dict)
    return str(err.body["message"])


def _fallbacks(raw: Any) -> str:
    return str(raw.headers.get("x-omnimind-fallbacks", ""))


# ---- health per deployment and per provider ----------------------------------------------


def test_retry_after_cools_one_model_not_its_provider(
    client: openai.OpenAI, http: httpx.Client, fake: FakeOpenAI
) -> None:
    raw = _raw(client, "cool-a")
    assert _fallbacks(raw) == "shared:rate_limited"
    assert raw.headers["x-omnimind-provider"] == "backup"
    calls = len(fake.calls("shared"))
    assert _fallbacks(_raw(client, "cool-a")) == "shared:cooling_down"  # no call made
    assert len(fake.calls("shared")) == calls
    raw = _raw(client, "cool-b")  # another model on the same provider: served there
    assert raw.headers["x-omnimind-provider"] == "shared" and not _fallbacks(raw)
    assert raw.parse().choices[0].message.content == "echo: hello there"
    state = provider_state(http, "shared")
    assert state["available"] is True and state["cooldown_remaining_s"] == 0
    assert 5 < state["deployments"]["status-429"]["cooldown_remaining_s"] <= 7
    assert state["deployments"]["echo"]["cooldown_remaining_s"] == 0


def test_refused_connections_eject_the_provider_for_every_model(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    for _ in range(2):
        assert _fallbacks(_raw(client, "refused-a")) == "refused:connect_error"
    state = provider_state(http, "refused")
    assert state["state"] == "open" and state["ejections"] == 1
    assert state["available"] is False
    started = time.monotonic()
    raw = _raw(client, "refused-b")  # a model never tried there: skipped with its host
    assert _fallbacks(raw) == "refused:circuit_open"
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert time.monotonic() - started < 2


# ---- which upstream answers fall back ------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "reason", "counted_on"),
    [
        ("pay", "payment_required", "provider"),  # 402: the account, not this model
        ("gone", "not_served", "deployment"),  # 410: this model is gone from there
        ("ctx-400", "context_too_long", None),  # a 400 saying the prompt is too long
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_4xx_that_fall_back(
    client: openai.OpenAI,
    http: httpx.Client,
    alias: str,
    reason: str,
    counted_on: str | None,
    stream: bool,
) -> None:
    provider = alias.removesuffix("-400")
    before = provider_state(http, provider)
    raw = _raw(client, alias, stream=stream)
    assert _fallbacks(raw) == f"{provider}:{reason}"
    assert raw.headers["x-omnimind-provider"] == "backup"
    answer = raw.parse()
    text = (
        "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        if stream
        else answer.choices[0].message.content
    )
    assert text == "echo: hello there"
    after = provider_state(http, provider)
    model = next(iter(after["deployments"]))
    host_failures = after["consecutive_failures"] - before["consecutive_failures"]
    deployment = after["deployments"][model]["consecutive_failures"]
    deployment_before = before["deployments"].get(model, {"consecutive_failures": 0})
    deployment_failures = deployment - deployment_before["consecutive_failures"]
    assert host_failures == (1 if counted_on == "provider" else 0)
    assert deployment_failures == (1 if counted_on == "deployment" else 0)


# ---- context windows -----------------------------------------------------------------------


def test_entry_whose_window_is_too_small_is_skipped_without_a_call(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    raw = _raw(client, "window", messages=LONG_PROMPT)
    assert _fallbacks(raw) == "small:context_too_long"
    assert raw.headers["x-omnimind-provider"] == "large"
    raw = _raw(client, "window", max_tokens=200)  # a short prompt, but the answer counts too
    assert _fallbacks(raw) == "small:context_too_long"
    raw = _raw(client, "window", max_completion_tokens=200)
    assert _fallbacks(raw) == "small:context_too_long"
    raw = _raw(client, "window", max_tokens=5)  # fits
    assert raw.headers["x-omnimind-provider"] == "small" and not _fallbacks(raw)
    assert [s.body["max_tokens"] for s in fake.calls("small")] == [5]


@pytest.mark.parametrize("stream", [False, True])
def test_nothing_fits_is_a_400_naming_the_largest_window(
    client: openai.OpenAI, http: httpx.Client, fake: FakeOpenAI, stream: bool
) -> None:
    calls = len(fake.calls())
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="window-none", messages=LONG_PROMPT, stream=stream)
    assert err.value.code == "context_length_exceeded"
    message = _said(err.value)
    assert "120 tokens" in message  # the largest window of the chain
    assert "50" not in message.split("120 tokens")[0]
    assert len(fake.calls()) == calls
    resp = http.post("/v1/chat/completions", json=chat("window-none", stream, LONG_PROMPT))
    schemas.error(resp.json())
    assert resp.json()["error"]["type"] == "invalid_request_error"


# ---- waiting and timeouts ------------------------------------------------------------------


async def test_waiting_for_a_slot_is_not_an_attempt_timeout(
    gw: UvicornServer, http: httpx.Client, audit: Path
) -> None:
    """max_concurrency 1, timeout 2.5 s, answers taking 2 s: the second waits for the first."""
    async with openai.AsyncOpenAI(
        base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as aclient:

        async def ask() -> Any:
            return await aclient.chat.completions.with_raw_response.create(
                model="narrow", messages=USER
            )

        first = asyncio.ensure_future(ask())

        def holding() -> bool:
            return bool(provider_state(http, "narrow")["in_flight"] == 1)

        assert await asyncio.to_thread(wait_for, holding)  # the first holds the slot
        started = time.monotonic()
        second = await ask()
        waited = time.monotonic() - started
        await first
    assert second.parse().choices[0].message.content == "echo: hello there"
    assert not _fallbacks(second)
    assert waited > 2.5  # longer than the attempt timeout, yet no timeout
    state = provider_state(http, "narrow")
    assert state["errors"] == 0 and state["consecutive_failures"] == 0
    assert state["deployments"]["slow-2000"]["errors"] == 0
    line = audit_line(audit, second.headers["x-request-id"])
    assert line["queue_ms"] > 800 and line["attempts"] == []


def test_first_token_timeout_longer_than_timeout_governs_the_first_chunk(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """timeout 1 s, first_token_timeout 3 s, the first chunk after 1.5 s: served."""
    started = time.monotonic()
    stream = client.chat.completions.create(model="coldstart", messages=USER, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: hello there"
    assert time.monotonic() - started > 1.4
    state = provider_state(http, "coldstart")
    assert state["errors"] == 0
    deployment = state["deployments"]["slow-first-1500"]
    assert deployment["ttft_ms"]["p50"] >= 1400  # two windows: first token, whole stream
    assert deployment["latency_ms"]["p50"] >= deployment["ttft_ms"]["p50"]


def test_failure_after_the_first_chunk_counts_against_the_deployment(http: httpx.Client) -> None:
    for n in (1, 2):
        resp = http.post("/v1/chat/completions", json=chat("midway", stream=True))
        assert resp.headers["x-omnimind-provider"] == "midway"  # committed, then it failed
        error = json.loads(sse_data(resp)[-1])
        schemas.error(error)
        deployment = provider_state(http, "midway")["deployments"]["error-mid"]
        assert deployment["errors"] == n
        assert deployment["last_error"]["reason"] == "stream_error"
    state = provider_state(http, "midway")
    assert state["deployments"]["error-mid"]["state"] == "open"  # 2 failures: ejected
    assert state["state"] == "closed"  # the host is fine
    resp = http.post("/v1/chat/completions", json=chat("midway", stream=True))
    assert resp.headers["x-omnimind-fallbacks"] == "midway:circuit_open"
    assert resp.headers["x-omnimind-provider"] == "backup"


async def test_a_burst_of_timeouts_ejects_once(gw: UvicornServer, http: httpx.Client) -> None:
    """20 requests admitted together all time out: one ejection, not seven."""
    async with httpx.AsyncClient(
        base_url=gw.url, timeout=30, limits=httpx.Limits(max_connections=40)
    ) as aclient:
        answers = await asyncio.gather(
            *(aclient.post("/v1/chat/completions", json=chat("burst")) for _ in range(20))
        )
    assert all(a.status_code == 200 for a in answers)
    assert all(a.headers["x-omnimind-provider"] == "backup" for a in answers)
    deployment = provider_state(http, "burst")["deployments"]["hang"]
    assert deployment["state"] == "open"
    assert deployment["ejections"] == 1


# ---- real-time status ---------------------------------------------------------------------


def test_refused_provider_is_shown_unavailable_everywhere(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    assert _fallbacks(_raw(client, "down")) == "down:connect_error"
    state = provider_state(http, "down")
    assert state["available"] is False and state["reachable"] is False
    assert state["state"] == "closed"  # not ejected: unreachable as last seen is enough
    assert http.get("/v1/stats").json()["providers"]["down"] is False
    assert metric(http, "omnimind_provider_available", provider="down") == 0
    assert metric(http, "omnimind_provider_available", provider="backup") == 1


def test_health_checks_find_a_refused_provider_without_traffic(http: httpx.Client) -> None:
    assert wait_for(lambda: provider_state(http, "probed")["available"] is False)
    state = provider_state(http, "probed")
    assert state["reachable"] is False
    assert state["requests"] == 0 and state["errors"] == 0  # probes are not requests
    assert http.get("/v1/stats").json()["providers"]["probed"] is False


# ---- what the client is told, what is recorded ----------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_all_failed_message_carries_the_upstreams_own_words(
    client: openai.OpenAI, stream: bool
) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="excerpt", messages=USER, stream=stream)
    assert err.value.status_code == 502
    message = _said(err.value)
    assert "excerpt (llamacpp-500): server_error 500" in message
    said = message.split(" - ", 1)[1]
    assert said.startswith('Failed to parse messages: Unsupported content part type: "input_audio"')
    assert len(said) <= EXCERPT and said.endswith("...")


def test_upstream_words_are_redacted(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="leaky", messages=USER)
    said = _said(err.value)
    assert "leaky (status-401): upstream_auth 401 - fake upstream says 401" in said
    assert CANARY not in said and CANARY not in err.value.response.text


@pytest.mark.parametrize("stream", [False, True])
def test_rejected_request_still_records_its_attempt(
    client: openai.OpenAI, http: httpx.Client, audit: Path, fake: FakeOpenAI, stream: bool
) -> None:
    backup_calls = len(fake.calls("backup"))
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.with_raw_response.create(
            model="rejecting", messages=USER, stream=stream
        )
    assert _said(err.value) == "fake upstream says 400"
    assert len(fake.calls("backup")) == backup_calls  # relayed, not retried elsewhere
    line = audit_line(audit, err.value.response.headers["x-request-id"])
    assert line["status"] == 400 and line["outcome"] == "rejected"
    assert [(a["provider"], a["reason"], a["status"]) for a in line["attempts"]] == [
        ("rejecting", "client_error", 400)
    ]
    labels = {"alias": "rejecting", "model": "status-400", "provider": "rejecting"}
    labels["reason"] = "client_error"  # the exposition's label order: sorted
    assert (metric(http, "omnimind_fallbacks_total", **labels) or 0) >= 1


def test_python_api_attempts_status_and_latency(fake_url: str, tmp_path: Path) -> None:
    config = {
        "server": {"audit_log": "off"},
        "providers": {
            "rejecting": openai_provider(fake_url, "py-rejecting", breaker=NO_BREAKER),
            "dead": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{refused_port()}/v1",
                "breaker": NO_BREAKER,
            },  # fmt: skip
            "backup": openai_provider(fake_url, "py-backup", breaker=NO_BREAKER),
        },
        "models": {
            "rejecting": [entry("rejecting", "status-400"), entry("backup", "echo")],
            "dead-first": [entry("dead", "x"), entry("backup", "echo")],
        },
    }
    router = get_llm_router(write_config(tmp_path, config))
    try:
        rejected = router.invoke_sync("hi", tier="rejecting")
        assert rejected.success is False and "fake upstream says 400" in (rejected.error or "")
        assert [(a.provider, a.reason, a.status) for a in rejected.attempts] == [
            ("rejecting", Reason.CLIENT_ERROR, 400)
        ]
        assert router.get_provider_status() == {"rejecting": True, "dead": True, "backup": True}
        answer = router.invoke_sync("hi", tier="dead-first")
        assert answer.success and answer.provider == "backup"
        assert type(answer.latency_ms) is int and type(rejected.latency_ms) is int
        assert answer.fallbacks == ["dead:connect_error"]
        assert router.get_provider_status()["dead"] is False  # refused when last seen
    finally:
        router.close()
