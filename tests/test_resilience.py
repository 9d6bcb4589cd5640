"""Resilience: the circuit breaker, Retry-After, deadlines, disconnects, hedging.

The fault matrix (every upstream fault in both modes, for every adapter) is in
test_contract.py; the routing rules of issue 14 are in test_routing.py.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from proxy.app import create_app
from proxy.config import load
from proxy.httpproto import uvicorn_options

from . import schemas
from .conftest import GatewayFactory
from .fake_openai import FakeOpenAI
from .servers import UvicornServer, open_fds, settle, task_count
from .test_hardening_support import OptionsServer

NO_BREAKER = "breaker: {{failures: 1000000, max_cooldown: 0.001}}"


def _provider(name: str, url: str, extra: str = NO_BREAKER) -> str:
    return f"""
  {name}:
    type: openai
    base_url: {url}/{name}/v1
    timeout: 1
    connect_timeout: 1
    first_token_timeout: 1
    {extra}"""


def _config(url: str) -> str:
    providers = (
        "".join(
            [
                _provider("faulty", url),
                _provider("backup", url),
                _provider("flaky", url, "breaker: {{failures: 2, cooldown: 0.4}}"),
                _provider("limited", url, "breaker: {{failures: 1000000}}"),
                _provider("alone", url, "breaker: {{failures: 1000000}}"),
                _provider(
                    "slowpoke", url, NO_BREAKER + "\n    timeout: 5\n    first_token_timeout: 5"
                ),
                _provider("retrier", url, NO_BREAKER + "\n    retries: 2\n    retry_backoff: 0.01"),
            ]
        )
        .replace("{{", "{")
        .replace("}}", "}")
    )
    return f"""
server: {{request_timeout: 4}}
providers:
{providers}
models:
  f-status-500: [{{provider: faulty, model: status-500}}, {{provider: backup, model: echo}}]
  breaker-fail: [{{provider: flaky, model: status-500}}, {{provider: backup, model: echo}}]
  breaker-ok: [{{provider: flaky, model: echo}}, {{provider: backup, model: echo}}]
  limited: [{{provider: limited, model: status-429}}, {{provider: backup, model: echo}}]
  limited-ok: [{{provider: limited, model: echo}}, {{provider: backup, model: echo}}]
  alone: [{{provider: alone, model: status-429}}]
  drip: [{{provider: slowpoke, model: drip-100-50}}]
  silent: [{{provider: slowpoke, model: drip-2-60000, timeout: 30}}]
  hang: [{{provider: slowpoke, model: hang}}]
  retried: [{{provider: retrier, model: status-502}}, {{provider: backup, model: echo}}]
  hedged:
    hedge_after_ms: 100
    chain: [{{provider: slowpoke, model: slow-1500}}, {{provider: backup, model: echo}}]
  hedged-stream:
    hedge_after_ms: 100
    chain: [{{provider: slowpoke, model: slow-first-1500}}, {{provider: backup, model: echo}}]
  hedged-fast:
    hedge_after_ms: 500
    chain: [{{provider: backup, model: echo}}, {{provider: slowpoke, model: echo}}]
"""


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, fake_url: str) -> Iterator[UvicornServer]:
    yield start_gateway(_config(fake_url))


@pytest.fixture(scope="module")
def served(
    gw: UvicornServer, fake_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UvicornServer | OptionsServer]:
    """The same gateway on `serve`'s own HTTP protocol (httpproto: it reports a client
    that leaves through a scope extension, where plain uvicorn needs a watcher task)."""
    path = tmp_path_factory.mktemp("served") / "models.yaml"
    path.write_text(textwrap.dedent(_config(fake_url)), encoding="utf-8")
    config = load(path)
    server = OptionsServer(create_app(config), lifespan="on", **uvicorn_options(config.server))
    yield server
    server.close()


@pytest.fixture(params=["plain uvicorn", "serve's protocol"])
def any_gw(request: pytest.FixtureRequest, gw: UvicornServer) -> UvicornServer | OptionsServer:
    if request.param == "plain uvicorn":
        return gw
    served: UvicornServer | OptionsServer = request.getfixturevalue("served")
    return served


@pytest.fixture
def http(gw: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


def _post(http: httpx.Client, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return http.post("/v1/chat/completions", json=body)


def _events(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]


def _provider_state(http: httpx.Client, name: str) -> dict[str, object]:
    data = http.get("/v1/providers").json()["data"]
    return next(p for p in data if p["id"] == name)


def test_client_disconnect_mid_stream_cancels_upstream(
    any_gw: UvicornServer | OptionsServer, fake: FakeOpenAI
) -> None:
    fds, tasks = open_fds(), _tasks(any_gw)
    body = {"model": "drip", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with (
        httpx.Client(base_url=any_gw.url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as resp,
    ):
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert fake.active == 1
    gone = time.monotonic()
    assert settle(lambda: fake.active, 0, within=2) == 0
    assert time.monotonic() - gone < 1.0
    assert settle(lambda: _tasks(any_gw), tasks) <= tasks
    assert settle(open_fds, fds, slack=2) <= fds + 2


def test_client_disconnect_non_stream_cancels_upstream(
    any_gw: UvicornServer | OptionsServer, fake: FakeOpenAI
) -> None:
    tasks = _tasks(any_gw)
    with (
        httpx.Client(base_url=any_gw.url, timeout=0.3) as impatient,
        pytest.raises(httpx.ReadTimeout),
    ):
        _post(impatient, "hang")
    gone = time.monotonic()
    assert settle(lambda: fake.active, 0, within=2) == 0
    assert time.monotonic() - gone < 1.0
    assert settle(lambda: _tasks(any_gw), tasks) <= tasks


def _tasks(server: UvicornServer | OptionsServer) -> int:
    return task_count(server.thread)


def test_breaker_opens_per_deployment(http: httpx.Client, fake: FakeOpenAI) -> None:
    """5xx from one model eject that deployment; the provider's other models still serve."""
    for _ in range(2):
        assert _post(http, "breaker-fail").headers["x-omnimind-fallbacks"] == "flaky:server_error"
    state = _provider_state(http, "flaky")
    deployment = state["deployments"]["status-500"]  # type: ignore[index]
    assert deployment["state"] == "open"
    assert state["state"] == "closed" and state["available"] is True
    calls = len(fake.calls("flaky"))
    resp = _post(http, "breaker-fail")
    assert resp.headers["x-omnimind-fallbacks"] == "flaky:circuit_open"
    assert len(fake.calls("flaky")) == calls  # skipped without a call
    resp = _post(http, "breaker-ok")  # another model on the same provider: served at once
    assert resp.headers["x-omnimind-provider"] == "flaky"
    assert "x-omnimind-fallbacks" not in resp.headers
    time.sleep(0.45)  # cooldown over: one half-open probe decides
    state = _provider_state(http, "flaky")
    assert state["deployments"]["status-500"]["state"] == "half_open"  # type: ignore[index]
    assert state["last_error"]["reason"] == "server_error"  # type: ignore[index]


def test_retry_after_cools_the_deployment(http: httpx.Client, fake: FakeOpenAI) -> None:
    """A 429 with Retry-After on one model cools that model only."""
    assert _post(http, "limited").headers["x-omnimind-fallbacks"] == "limited:rate_limited"
    calls = len(fake.calls("limited"))
    resp = _post(http, "limited")  # the model asked us to wait: skipped without a call
    assert resp.headers["x-omnimind-fallbacks"] == "limited:cooling_down"
    assert len(fake.calls("limited")) == calls
    resp = _post(http, "limited-ok")  # another model on the same provider is served
    assert resp.headers["x-omnimind-provider"] == "limited"
    state = _provider_state(http, "limited")
    cooling = state["deployments"]["status-429"]  # type: ignore[index]
    assert 5 < cooling["cooldown_remaining_s"] <= 7
    assert cooling["state"] == "closed"  # rate limits are not hard failures
    assert state["cooldown_remaining_s"] == 0


def test_all_cooling_answers_429_at_once(http: httpx.Client, fake: FakeOpenAI) -> None:
    assert _post(http, "alone").status_code == 429
    calls = len(fake.calls("alone"))
    started = time.monotonic()
    resp = _post(http, "alone")
    assert resp.status_code == 429 and time.monotonic() - started < 0.5
    assert 1 <= int(resp.headers["retry-after"]) <= 7
    assert resp.headers["x-omnimind-fallbacks"] == "alone:cooling_down"
    assert len(fake.calls("alone")) == calls
    schemas.error(resp.json())


def test_request_deadline_bounds_a_stream(http: httpx.Client) -> None:
    started = time.monotonic()
    resp = _post(http, "drip", stream=True)  # 100 chunks 50 ms apart: past the 4 s deadline
    assert 3.5 < time.monotonic() - started < 5
    last = json.loads(_events(resp)[-1])
    schemas.error(last)
    assert last["error"]["code"] == "deadline"


def test_request_deadline_bounds_a_silent_stream(http: httpx.Client, fake: FakeOpenAI) -> None:
    """One chunk, then nothing: the deadline (4 s) ends it though the read timeout is 30 s."""
    started = time.monotonic()
    resp = _post(http, "silent", stream=True)
    assert 3.5 < time.monotonic() - started < 5
    events = _events(resp)
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "0 "
    last = json.loads(events[-1])
    schemas.error(last)
    assert last["error"]["code"] == "deadline"
    assert settle(lambda: fake.active, 0, within=2) == 0  # the upstream request was closed


def test_request_deadline_bounds_a_hang(http: httpx.Client) -> None:
    started = time.monotonic()
    resp = _post(http, "hang")
    assert resp.status_code == 504 and time.monotonic() - started < 4.5
    schemas.error(resp.json())


def test_configured_retries_stay_on_the_provider(http: httpx.Client) -> None:
    resp = _post(http, "retried")
    assert resp.headers["x-omnimind-fallbacks"] == ",".join(["retrier:server_error"] * 3)
    assert resp.headers["x-omnimind-provider"] == "backup"


@pytest.mark.parametrize(("alias", "stream"), [("hedged", False), ("hedged-stream", True)])
def test_hedging_serves_the_faster_entry(
    http: httpx.Client, fake: FakeOpenAI, alias: str, stream: bool
) -> None:
    started = time.monotonic()
    resp = _post(http, alias, stream)
    assert time.monotonic() - started < 1.0  # the slow entry would take 1.5 s
    assert resp.headers["x-omnimind-provider"] == "backup"
    assert resp.headers["x-omnimind-fallbacks"] == "slowpoke:hedge_lost"
    assert settle(lambda: fake.active, 0, within=2) == 0  # the slower one was cancelled


def test_hedging_leaves_a_fast_first_entry_alone(http: httpx.Client, fake: FakeOpenAI) -> None:
    calls = len(fake.calls("slowpoke"))
    resp = _post(http, "hedged-fast")
    assert resp.headers["x-omnimind-provider"] == "backup"
    assert "x-omnimind-fallbacks" not in resp.headers
    assert len(fake.calls("slowpoke")) == calls


def test_providers_endpoint_shape(http: httpx.Client) -> None:
    _post(http, "f-status-500")
    backup = _provider_state(http, "backup")
    assert backup["type"] == "openai" and backup["available"] is True
    assert backup["latency_ms"]["p50"] is not None  # type: ignore[index]
    assert {"state", "cooldown_remaining_s", "last_error", "in_flight", "queued"} <= set(backup)
