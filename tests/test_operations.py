"""Operations: metrics, cost, seed stats, audit log and secrets, auth, rate limits, reload."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.config import load

from . import schemas
from .conftest import GatewayFactory
from .servers import UvicornServer, refused_port

CANARY_KEY = "sk-canary-KEY-9f8e7d6c"
CANARY_PROMPT = "canary-prompt-5a4b3c"
GATEWAY_KEY = "gw-key-0123456789"
TEAM_KEY = "gw-team-key-abcdef"


def _config(url: str, server: str = "", audit: Path | None = None) -> str:
    return f"""
server:
  audit_log: {audit or "off"}
  {server or "request_timeout: 10"}
providers:
  main:
    type: openai
    base_url: {url}/main/v1
    api_key: ${{OPS_TEST_CANARY}}
    breaker: {{failures: 1000000, max_cooldown: 0.001}}
  dead:
    type: openai
    base_url: http://127.0.0.1:{refused_port()}/v1
models:
  priced:
    - {{provider: main, model: echo, input_cost_per_mtok: 2.0, output_cost_per_mtok: 10.0}}
  fallback:
    - {{provider: dead, model: x}}
    - {{provider: main, model: echo}}
  faults:
    - {{provider: main, model: status-401}}
    - {{provider: main, model: status-500}}
    - {{provider: main, model: bad-json}}
    - {{provider: main, model: echo}}
  bad:
    - {{provider: main, model: status-400}}
"""


@pytest.fixture(scope="module", autouse=True)
def canary_env() -> Iterator[None]:
    os.environ["OPS_TEST_CANARY"] = CANARY_KEY
    os.environ["OPS_TEST_TEAM_KEY"] = TEAM_KEY
    yield
    os.environ.pop("OPS_TEST_CANARY", None)
    os.environ.pop("OPS_TEST_TEAM_KEY", None)


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, fake_url: str, audit_path: Path) -> UvicornServer:
    return start_gateway(_config(fake_url, audit=audit_path))


def _audit_lines(path: Path, after: int = 0) -> list[dict[str, object]]:
    time.sleep(0.2)  # lines are written in batches every 50 ms
    return [json.loads(line) for line in path.read_text().splitlines()[after:]]


@pytest.fixture
def http(gw: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


def _chat(http: httpx.Client, model: str, stream: bool = False, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": f"{CANARY_PROMPT} hi"}],
            "stream": stream, **extra}  # fmt: skip
    return http.post("/v1/chat/completions", json=body)


def _samples(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = http.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_real_requests(http: httpx.Client) -> None:
    before = _samples(http)
    _chat(http, "priced")
    _chat(http, "priced", stream=True, stream_options={"include_usage": True})
    _chat(http, "fallback")
    _chat(http, "fallback", stream=True)
    after = _samples(http)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    ok = {"provider": "main", "outcome": "ok"}
    assert delta("omnimind_requests_total", alias="priced", **ok) == 2
    assert delta("omnimind_requests_total", alias="fallback", **ok) == 2
    assert delta("omnimind_fallbacks_total", alias="fallback", provider="dead", model="x",
                 reason="connect_error") == 2  # fmt: skip
    assert delta("omnimind_request_duration_seconds_count", provider="main") == 4
    assert delta("omnimind_time_to_first_token_seconds_count", provider="main") == 2
    # the fake counts words: "<canary> hi" is 2 prompt tokens, "echo: <canary> hi" 3 completion
    assert delta("omnimind_tokens_total", provider="main", model="echo", kind="prompt") == 6
    assert delta("omnimind_tokens_total", provider="main", model="echo", kind="completion") == 9
    assert delta("omnimind_cost_usd_total", provider="main", model="echo") == pytest.approx(
        2 * (2 * 2.0 + 3 * 10.0) / 1e6
    )
    # refused when last tried: not available now, though its breaker is still closed
    assert _value(after, "omnimind_provider_available", provider="dead") == 0
    assert _value(after, "omnimind_provider_circuit_state", provider="main") == 0


def test_cost_is_reported_on_the_answer(http: httpx.Client) -> None:
    resp = _chat(http, "priced")
    assert float(resp.headers["x-omnimind-cost-usd"]) == pytest.approx((2 * 2 + 3 * 10) / 1e6)
    resp = _chat(http, "priced", stream=True, stream_options={"include_usage": True})
    comments = [line for line in resp.text.splitlines() if line.startswith(": x-omnimind-cost")]
    assert float(comments[0].split(": ")[-1]) == pytest.approx(34 / 1e6)
    assert "x-omnimind-cost-usd" not in _chat(http, "fallback").headers  # no prices: no cost


def test_seed_counters(http: httpx.Client) -> None:
    before = http.get("/v1/stats").json()
    _chat(http, "fallback")
    _chat(http, "bad")
    after = http.get("/v1/stats").json()
    assert after["requests_total"] - before["requests_total"] == 2
    assert after["requests_success"] - before["requests_success"] == 1
    assert after["fallback_used"] - before["fallback_used"] == 1
    assert after["latency_by_provider"]["main"] >= 0
    assert after["providers"] == {"main": True, "dead": False}  # refused: not available now


def test_audit_log_is_json_without_secrets_or_content(
    http: httpx.Client, audit_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen = len(_audit_lines(audit_path))
    for stream in (False, True):
        for model in ("faults", "fallback", "bad", "priced"):
            _chat(http, model, stream)
    audit: list[Any] = _audit_lines(audit_path, seen)
    assert len(audit) == 8
    faults = next(a for a in audit if a["alias"] == "faults" and not a["stream"])
    assert [a["reason"] for a in faults["attempts"]] == [
        "upstream_auth",
        "server_error",
        "bad_response",
    ]
    assert faults["provider"] == "main" and faults["status"] == 200
    assert next(a for a in audit if a["alias"] == "bad")["status"] == 400
    everything = audit_path.read_text() + "\n".join(r.getMessage() for r in caplog.records)
    assert CANARY_KEY not in everything  # the 401 echoed it back: scrubbed
    assert CANARY_PROMPT not in everything
    assert "messages" not in audit[0]


def test_gateway_never_leaks_an_upstream_key_to_the_client(http: httpx.Client) -> None:
    for stream in (False, True):
        assert CANARY_KEY not in _chat(http, "faults", stream).text
        assert CANARY_KEY not in _chat(http, "bad", stream).text
    assert CANARY_KEY not in http.get("/v1/providers").text


def test_log_content_opt_in(start_gateway: GatewayFactory, fake_url: str, tmp_path: Path) -> None:
    gw = start_gateway(_config(fake_url, "log_content: true", audit=tmp_path / "a.jsonl"))
    with httpx.Client(base_url=gw.url) as http:
        _chat(http, "priced")
    line: Any = _audit_lines(tmp_path / "a.jsonl")[0]
    assert line["messages"][0]["content"].startswith(CANARY_PROMPT)


def test_api_keys_and_rate_limits(start_gateway: GatewayFactory, fake_url: str) -> None:
    server = f"""api_keys:
    - {GATEWAY_KEY}
    - {{id: team, key: "${{OPS_TEST_TEAM_KEY}}", rate_limit_rpm: 2}}
  metrics_auth: true"""
    gw = start_gateway(_config(fake_url, server))
    with httpx.Client(base_url=gw.url) as http:
        assert http.get("/health").status_code == 200  # always open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}):
            resp = http.post("/v1/chat/completions", json={}, headers=headers)
            assert resp.status_code == 401
            schemas.error(resp.json())
        assert http.get("/v1/models").status_code == 401
        assert http.get("/metrics").status_code == 401
        ok = http.get("/v1/models", headers={"x-api-key": GATEWAY_KEY})
        assert ok.status_code == 200
        assert http.get("/metrics", headers={"x-api-key": GATEWAY_KEY}).status_code == 200
        team = {"Authorization": f"Bearer {TEAM_KEY}"}
        assert http.get("/v1/models", headers=team).status_code == 200
        assert http.get("/v1/models", headers=team).status_code == 200
        limited = http.get("/v1/models", headers=team)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        schemas.error(limited.json())
        assert http.get("/v1/models", headers={"x-api-key": GATEWAY_KEY}).status_code == 200
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=GATEWAY_KEY) as client:
        answer = client.chat.completions.create(
            model="priced", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "echo: hi"


def _wait_for(predicate: object, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_hot_reload(tmp_path: Path, fake_url: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(_config(fake_url), encoding="utf-8")
    server = UvicornServer(create_app(load(path)))
    try:
        with httpx.Client(base_url=server.url) as http:

            def aliases() -> list[str]:
                return [m["id"] for m in http.get("/v1/models").json()["data"]]

            _chat(http, "priced")
            served = next(p for p in http.get("/v1/providers").json()["data"] if p["id"] == "main")
            path.write_text(
                _config(fake_url) + "  added:\n    - {provider: main, model: echo}\n",
                encoding="utf-8",
            )
            assert _wait_for(lambda: "added" in aliases())
            assert _chat(http, "added").status_code == 200
            main = next(p for p in http.get("/v1/providers").json()["data"] if p["id"] == "main")
            assert main["requests"] > served["requests"]  # same provider, state carried over

            caplog.set_level(logging.ERROR, logger="omnimind.gateway")
            path.write_text("providers: {main: {type: nope}}\nmodels: {}\n", encoding="utf-8")
            assert _wait_for(lambda: any("reload rejected" in r.message for r in caplog.records))
            assert "added" in aliases() and _chat(http, "added").status_code == 200
    finally:
        server.close()
