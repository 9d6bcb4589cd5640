"""Hostile clients and operators' accidents against a real gateway: the edge checks, the
lifecycle of a request, the audit log's writer, and config reloads."""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .fake_malicious import FakeMalicious
from .servers import open_fds, settle
from .test_hardening_support import (
    GATEWAY_CANARY,
    GatewayServer,
    audit_lines,
    canary_env,  # noqa: F401 - a fixture
    mal,  # noqa: F401 - a fixture
    malicious_config,
    one_alias_config,
    sink,  # noqa: F401 - a fixture
    write_config,
)

# Needs the pipeline to call `gateway.check_body(body)` and answer CORS (see the report).
MESSAGES: Any = [{"role": "user", "content": "hi"}]
AUTH = {"authorization": f"Bearer {GATEWAY_CANARY}"}


@pytest.fixture(scope="module")
def gw(
    canary_env: None,  # noqa: F811
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    path = tmp_path_factory.mktemp("cfg") / "models.yaml"
    server = GatewayServer(write_config(path, malicious_config(mal[1], "off")))
    yield server
    server.close()


@pytest.fixture
def http(gw: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, headers=AUTH, timeout=30) as c:
        yield c


def _post(http: httpx.Client, content: bytes, **headers: str) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
    )


def _providers(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in http.get("/v1/providers").json()["data"]}


# ---- the edge --------------------------------------------------------------------------


def test_huge_and_numerous_headers_get_431(gw: GatewayServer, http: httpx.Client) -> None:
    many = {f"x-h{i}": "v" for i in range(300)}
    assert http.get("/health", headers=many).status_code == 431
    assert http.get("/health", headers={"x-big": "a" * 200_000}).status_code == 431
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m-echo","messages":[{"role":"user","content":"\xff\xfe"}]}',
        pytest.param(
            b'{"model":"m-echo","messages":[{"role":"user","content":"hi"}],"x":'
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
        ),
    ],
    ids=["invalid-utf8", "deep-json"],
)
def test_bad_bodies_are_400_at_the_edge(
    http: httpx.Client,
    mal: tuple[FakeMalicious, str],  # noqa: F811
    body: bytes,
) -> None:
    calls = len(mal[0].headers_seen)
    for _ in range(8):
        resp = _post(http, body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error"
    assert len(mal[0].headers_seen) == calls  # never forwarded
    assert _providers(http)["mal"]["state"] == "closed"


def test_request_ids_are_plain_and_the_upstream_gets_the_gateways_own(
    http: httpx.Client,
    mal: tuple[FakeMalicious, str],  # noqa: F811
) -> None:
    body = b'{"model":"m-echo","messages":[{"role":"user","content":"hi"}]}'
    assert _post(http, body, **{"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    for bad in ["x" * 129, "a b", "not/ok", "\u00e9t\u00e9"]:
        resp = http.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": b"application/json", "x-request-id": bad.encode()},
        )
        assert resp.status_code == 200
        assert resp.headers["x-request-id"] != bad and len(resp.headers["x-request-id"]) <= 128
    _post(http, body, **{"x-request-id": "client-chosen"})
    assert mal[0].headers_seen[-1].get("x-request-id") != "client-chosen"


@pytest.fixture(scope="module")
def keyless(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    path = tmp_path_factory.mktemp("keyless") / "models.yaml"
    text = malicious_config(mal[1], "off", "cors_origins: [https://app.example]")
    text = text.replace('api_keys: ["${HARD_GATEWAY}"]', "api_keys: []")
    os.environ.setdefault("HARD_CANARY", "unused")
    os.environ.setdefault("HARD_HEADER", "unused")
    os.environ.setdefault("HARD_CUSTOM", "unused")
    server = GatewayServer(write_config(path, text))
    yield server
    server.close()


def test_keyless_gateway_is_not_drivable_by_a_web_page(keyless: GatewayServer) -> None:
    body = b'{"model":"m-echo","messages":[{"role":"user","content":"hi"}]}'
    with httpx.Client(base_url=keyless.url, timeout=30) as c:
        ok = {"content-type": "application/json"}
        assert c.post("/v1/chat/completions", content=body, headers=ok).status_code == 200
        plain = {"content-type": "text/plain"}
        assert c.post("/v1/chat/completions", content=body, headers=plain).status_code == 415
        evil = {**ok, "origin": "https://evil.example"}
        assert c.post("/v1/chat/completions", content=body, headers=evil).status_code == 403
        rebound = {**ok, "host": "evil.example:8000"}
        assert c.post("/v1/chat/completions", content=body, headers=rebound).status_code in (
            403,
            421,
        )
        assert c.get("/v1/models", headers={"host": "evil.example"}).status_code in (403, 421)
        listed = {**ok, "origin": "https://app.example"}
        resp = c.post("/v1/chat/completions", content=body, headers=listed)
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "https://app.example"
        preflight = c.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        denied = c.options(
            "/v1/chat/completions",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in denied.headers


# ---- lifecycle -------------------------------------------------------------------------


def test_stream_client_leaving_before_the_first_chunk_frees_everything(
    gw: GatewayServer,
    http: httpx.Client,
    mal: tuple[FakeMalicious, str],  # noqa: F811
) -> None:
    fds = open_fds()
    body = b'{"model":"m-silent","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    for _ in range(3):
        with httpx.Client(base_url=gw.url, headers=AUTH, timeout=0.5) as c:
            with pytest.raises(httpx.ReadTimeout):
                _post(c, body)
    assert settle(lambda: mal[0].active, 0, within=2.0) == 0  # upstream calls cancelled
    state = _providers(http)["mal"]
    assert state["in_flight"] == 0
    assert state["last_error"] is None or state["last_error"]["reason"] != "timeout"
    assert settle(open_fds, fds, slack=4, within=3.0) <= fds + 4


def test_a_burst_of_concurrent_failures_is_one_ejection(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    text = f"""
    server: {{audit_log: off, request_timeout: 10}}
    providers:
      mal:
        type: openai
        base_url: {mal[1]}/v1
        timeout: 0.5
        breaker: {{failures: 1, cooldown: 2, max_cooldown: 300}}
    models:
      slow: [{{provider: mal, model: partial}}]
    """
    server = GatewayServer(write_config(tmp_path / "models.yaml", text))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: _try(client, "slow"), range(16)))
        state = httpx.get(f"{server.url}/v1/providers").json()["data"][0]
        deployment = state["deployments"]["partial"]  # a timeout is the model's, not the host's
        assert deployment["ejections"] == 1, state
        assert deployment["circuit_open_remaining_s"] <= 2.5, state
    finally:
        server.close()


def _try(client: openai.OpenAI, model: str) -> int:
    try:
        client.chat.completions.create(model=model, messages=MESSAGES)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_a_model_name_that_is_not_latin1_cannot_break_a_response(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    text = f"""
    server: {{audit_log: off}}
    providers:
      mal: {{type: openai, base_url: "{mal[1]}/v1", max_concurrency: 2}}
    models:
      "模型": [{{provider: mal, model: "名前-echo"}}]
    """
    server = GatewayServer(write_config(tmp_path / "models.yaml", text))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        for _ in range(4):
            answer = client.chat.completions.create(model="模型", messages=MESSAGES)
            assert answer.choices[0].message.content == "echo"
            chunks = list(
                client.chat.completions.create(model="模型", messages=MESSAGES, stream=True)
            )
            assert chunks
        assert httpx.get(f"{server.url}/v1/providers").json()["data"][0]["in_flight"] == 0
    finally:
        server.close()


# ---- the audit log never blocks --------------------------------------------------------


def test_a_stuck_audit_reader_never_blocks_the_gateway(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    read_end, write_end = os.pipe()  # nobody reads: the pipe fills after ~64 KB
    try:
        target = f"/proc/self/fd/{write_end}"
        text = one_alias_config(mal[1], f'audit_log: "{target}", audit_buffer: 50')
        server = GatewayServer(write_config(tmp_path / "models.yaml", text))
        try:
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            with httpx.Client(base_url=server.url, timeout=5) as c:
                for _ in range(400):  # ~300 bytes a line: far more than the pipe holds
                    assert _post(c, body, **{"x-request-id": "r" * 100}).status_code == 200
                started = time.monotonic()
                assert c.get("/health").status_code == 200
                assert time.monotonic() - started < 1
                assert server.gateway.observer.audit.dropped > 0
                metrics = c.get("/metrics").text.splitlines()
                dropped = [m for m in metrics if m.startswith("omnimind_audit_dropped_lines ")]
                assert float(dropped[0].split()[1]) > 0
        finally:
            os.close(read_end)  # the writer's stuck write fails: shutdown is not held
            read_end = -1
            server.close()
    finally:
        if read_end >= 0:
            os.close(read_end)
        os.close(write_end)


# ---- reloads ---------------------------------------------------------------------------


def _reload_config(mal_url: str, alias: str, audit: str) -> str:
    return one_alias_config(mal_url, f'audit_log: "{audit}"', alias)


def _aliases(server: GatewayServer) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}


def _wait_for(server: GatewayServer, alias: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if alias in _aliases(server):
            return True
        time.sleep(0.05)
    return False


def test_reload_survives_bad_files_and_keeps_auditing(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    audit = tmp_path / "audit.jsonl"
    path = write_config(tmp_path / "models.yaml", _reload_config(mal[1], "first", str(audit)))
    server = GatewayServer(path)
    body = b'{"model":"first","messages":[{"role":"user","content":"hi"}]}'
    try:
        path.write_bytes(b"models:\n  caf\xe9: []\n")  # not UTF-8: an invalid edit
        time.sleep(0.6)
        assert _aliases(server) == {"first"}
        path.write_text(_reload_config(mal[1], "second", str(audit)), encoding="utf-8")
        assert _wait_for(server, "second"), "the watcher died on the non-UTF-8 file"
        # an audit_log that cannot be opened: refused, the old config (and audit) stay
        bad = _reload_config(mal[1], "third", str(tmp_path / "no" / "such" / "dir.jsonl"))
        path.write_text(bad, encoding="utf-8")
        assert not _wait_for(server, "third", within=1.0)
        body = body.replace(b"first", b"second")
        with httpx.Client(base_url=server.url) as c:
            assert _post(c, body).status_code == 200
        server.gateway.observer.audit.flush()
        assert audit_lines(audit)[-1]["alias"] == "second"
        # a models.yaml in a sub-folder is not this config
        nested = tmp_path / "sub"
        nested.mkdir()
        (nested / "models.yaml").write_text(_reload_config(mal[1], "nested", str(audit)))
        assert not _wait_for(server, "nested", within=1.0)
    finally:
        server.close()


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted-proxy"])
def test_forwarded_for_is_believed_only_from_trusted_proxies(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path: Path,
    trusted: bool,
) -> None:
    proxies = "[127.0.0.1/32]" if trusted else "[]"
    text = one_alias_config(
        mal[1], f"audit_log: off, rate_limit_rpm: 2, trusted_proxies: {proxies}"
    )
    server = GatewayServer(write_config(tmp_path / "models.yaml", text))
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            statuses = [
                _post(c, body, **{"x-forwarded-for": f"203.0.113.{i}"}).status_code
                for i in range(4)
            ]
    finally:
        server.close()
    # rotating the header buys a fresh bucket only when the peer is a trusted proxy
    assert statuses == ([200] * 4 if trusted else [200, 200, 429, 429])


def test_header_limits_come_from_the_config(
    mal: tuple[FakeMalicious, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    text = one_alias_config(mal[1], "audit_log: off, max_headers: 20, max_header_bytes: 4096")
    server = GatewayServer(write_config(tmp_path / "models.yaml", text))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            assert c.get("/health", headers={f"x-{i}": "v" for i in range(10)}).status_code == 200
            assert c.get("/health", headers={f"x-{i}": "v" for i in range(25)}).status_code == 431
            assert c.get("/health", headers={"x-big": "a" * 5000}).status_code == 431
    finally:
        server.close()


@pytest.mark.parametrize(
    "content",
    [b'"\\ud800 lone surrogate"', b'{"nested": ["not", "text"]}', b'"\xff\xfe"'],
    ids=["lone-surrogate", "wrong-type", "invalid-utf8"],
)
def test_a_client_cannot_trip_a_providers_breaker(tmp_path: Path, content: bytes) -> None:
    from .fake_ollama import FakeOllama
    from .servers import AiohttpServer

    fake = FakeOllama()
    upstream = AiohttpServer(fake.app())
    text = f"""
    server: {{audit_log: off}}
    providers:
      oll:
        type: ollama
        base_url: {upstream.url}
        breaker: {{failures: 2, cooldown: 60}}
    models:
      m: [{{provider: oll, model: echo}}]
    """
    server = GatewayServer(write_config(tmp_path / "models.yaml", text))
    body = b'{"model":"m","messages":[{"role":"user","content":' + content + b"}]}"
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for stream in (b"false", b"true", b"false", b"true", b"false"):
                resp = _post(c, body[:-1] + b',"stream":' + stream + b"}")
                assert resp.status_code in (200, 400), resp.text  # never a provider failure
            state = c.get("/v1/providers").json()["data"][0]
            assert state["state"] == "closed", state
            assert all(d["state"] == "closed" for d in state["deployments"].values()), state
            ok = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            assert _post(c, ok).status_code == 200
    finally:
        server.close()
        upstream.close()
