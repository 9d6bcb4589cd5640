"""The hardening units on their own: redaction, edge checks, client address."""

from __future__ import annotations

import base64
import json
import logging
import textwrap
import urllib.parse
from pathlib import Path

import msgspec
import pytest

from proxy.config import ConfigError, ServerSpec, load
from proxy.edge import (
    BrowserGuard,
    ClientAddress,
    check_body,
    json_depth_exceeds,
)
from proxy.errors import GatewayError, InvalidRequest
from proxy.redact import MASK, LogFilter, Redactor, escape_controls, install, uninstall

KEY = "sk-canary-unit-1a2b3c4d"
HEADER_KEY = "hdr-canary-unit-5e6f7a8b"
BEARER = "tok-canary-unit-9c0d1e2f"
GW_KEY = "gw-canary-unit-3a4b5c6d"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setenv("UNIT_CANARY", KEY)
    path = tmp_path / "models.yaml"
    path.write_text(
        textwrap.dedent(f"""
        server:
          audit_log: off
          api_keys: [{GW_KEY}]
        providers:
          a: {{type: openai, base_url: "http://127.0.0.1:1/v1", api_key: "${{UNIT_CANARY}}"}}
          b:
            type: openai
            base_url: http://127.0.0.1:1/v1
            headers: {{x-api-key: {HEADER_KEY}, Authorization: "Bearer {BEARER}"}}
          c: {{type: ollama, base_url: "http://127.0.0.1:1", headers: {{api-key: {HEADER_KEY}x}}}}
        models:
          m: [{{provider: a, model: x}}]
        """),
        encoding="utf-8",
    )
    return load(path)


def test_redactor_masks_every_configured_secret_and_its_encodings(config: object) -> None:
    r = Redactor.from_config(config)  # type: ignore[arg-type]
    secrets = [KEY, HEADER_KEY, HEADER_KEY + "x", BEARER, GW_KEY, f"Bearer {BEARER}"]
    for s in secrets:
        forms = [
            s,
            urllib.parse.quote(s, safe=""),
            base64.b64encode(f"{s}:".encode()).decode(),
            base64.b64encode(f":{s}".encode()).decode(),
            json.dumps(s)[1:-1],
        ]
        for form in forms:
            out = r.text(f"upstream said <{form}> twice <{form}>")
            assert s not in out and form not in out, (s, form, out)
            assert MASK in out
    # the longer secret wins: no tail of it is left behind
    assert r.text(HEADER_KEY + "x") == MASK
    assert r.bytes(f"a {KEY} b".encode()) == f"a {MASK} b".encode()
    nested = {"error": {"message": KEY, "param": [BEARER, 3], KEY: None}}
    assert KEY not in json.dumps(r.obj(nested)) and BEARER not in json.dumps(r.obj(nested))
    assert r.obj({"n": 1, "s": "plain"}) == {"n": 1, "s": "plain"}


def test_redactor_without_secrets_is_identity() -> None:
    r = Redactor([])
    assert not r
    assert r.text("anything") == "anything"
    assert r.obj({"a": ["b"]}) == {"a": ["b"]}


def test_short_secrets_are_masked_but_not_their_encodings() -> None:
    r = Redactor(["abc"])
    assert r.text("xabcx") == f"x{MASK}x"
    assert r.text(base64.b64encode(b"abc:").decode()) == base64.b64encode(b"abc:").decode()


def test_escape_controls_keeps_one_line() -> None:
    out = escape_controls("boom\nINFO forged line\r\x1b[31m\x00\u2028end")
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\u2028" not in out
    assert out.startswith("boom\\nINFO forged line\\r\\x1b[31m")
    assert escape_controls(out) == out  # idempotent


def test_log_filter_masks_message_args_and_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log_filter = LogFilter(Redactor([KEY]))
    install(log_filter)
    try:
        log = logging.getLogger("omnimind.test_unit")
        with caplog.at_level(logging.INFO):
            log.warning("attempt failed: %s", f"401 {KEY}\nERROR forged")
            try:
                raise ValueError(f"bad key {KEY}")
            except ValueError:
                log.exception("boom %r", {"k": KEY})
            logging.getLogger("elsewhere").error("via root handler %s", KEY)
        text = caplog.text
    finally:
        uninstall(log_filter)
    assert KEY not in text
    assert "forged" in text and "\nERROR forged" not in text
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert "ValueError" in text  # the traceback is kept, masked


def test_redactor_cost_is_small(benchmark_budget: float = 20e-6) -> None:
    import time

    r = Redactor([f"sk-key-{i:04d}-abcdefgh" for i in range(50)])
    text = "Upstream returned 400: the model 'x' does not exist or you lack access " * 4
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        r.text(text)
    per_call = (time.perf_counter() - started) / n
    assert per_call < benchmark_budget * 10  # generous: a noisy shared machine


# ---- edge ------------------------------------------------------------------------------


def test_check_body_accepts_ordinary_json() -> None:
    check_body(b'{"model":"m","messages":[{"role":"user","content":"h\xc3\xa9 [[[{{{"}]}')
    deep_but_ok = b'{"a":' * 63 + b"1" + b"}" * 63
    check_body(deep_but_ok)
    many_siblings = b'{"m":[' + b",".join([b'{"a":[1]}'] * 5000) + b"]}"
    check_body(many_siblings)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[{"role":"user","content":"\xff\xfe"}]}',
        b'{"model":"m\xc3"}',
        b'{"a":' * 65 + b"1" + b"}" * 65,
        b"[" * 100_000,
        b'{"a":' + b"[" * 70 + b"]" * 70 + b"}",
    ],
)
def test_check_body_refuses_bad_utf8_and_deep_json(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_body(body)
    assert err.value.status == 400


def test_depth_scan_ignores_brackets_in_strings() -> None:
    body = b'{"s":"' + b"[" * 500 + b'\\"[[[", "t": "]]]"}'
    assert not json_depth_exceeds(body, 64)
    check_body(body)
    assert json_depth_exceeds(b"[" * 65 + b"]" * 65, 64)
    assert not json_depth_exceeds(b"[" * 64 + b"]" * 64, 64)


def test_check_body_cost() -> None:
    import time

    chat = {"model": "m", "messages": [{"role": "user", "content": "x [ { " * 50}] * 200}
    body = msgspec.json.encode(chat)
    started = time.perf_counter()
    for _ in range(50):
        check_body(body)
    per_mb = (time.perf_counter() - started) / 50 / (len(body) / 1e6)
    assert per_mb < 0.05  # well under 50 ms per MB even on a busy machine


def _h(**headers: str) -> dict[str, str]:
    return {k.replace("_", "-"): v for k, v in headers.items()}


def _status(guard: BrowserGuard, method: str, headers: dict[str, str]) -> int:
    try:
        guard.check(method, headers, "127.0.0.1")
    except GatewayError as exc:
        return exc.status
    return 200


def test_browser_guard_in_keyless_mode() -> None:
    server = msgspec.convert(
        {"cors_origins": ["http://app.example"], "allowed_hosts": ["gateway"]}, ServerSpec
    )
    g = BrowserGuard.from_server(server, keyless=True)
    json_ct = {"content_type": "application/json; charset=utf-8"}
    assert _status(g, "POST", _h(host="127.0.0.1:8000", **json_ct)) == 200
    assert _status(g, "POST", _h(host="localhost:8000", **json_ct)) == 200
    assert _status(g, "POST", _h(host="gateway:8000", **json_ct)) == 200
    assert _status(g, "GET", _h(host="127.0.0.1:8000")) == 200
    assert _status(g, "POST", _h(host="127.0.0.1:8000", content_type="text/plain")) == 415
    assert _status(g, "POST", _h(host="127.0.0.1:8000")) == 415
    assert _status(g, "POST", _h(host="evil.example:8000", **json_ct)) == 421
    assert _status(g, "GET", _h(host="rebound.example")) == 421
    evil = _h(host="127.0.0.1:8000", origin="http://evil.example", **json_ct)
    assert _status(g, "POST", evil) == 403
    other_port = _h(host="localhost:8000", origin="http://localhost:3000", **json_ct)
    assert _status(g, "POST", other_port) == 403
    assert _status(g, "POST", _h(host="localhost:8000", origin="null", **json_ct)) == 403
    same = _h(host="localhost:8000", origin="http://localhost:8000", **json_ct)
    assert _status(g, "POST", same) == 200
    listed = _h(host="127.0.0.1:8000", origin="http://app.example", **json_ct)
    assert _status(g, "POST", listed) == 200
    assert g.cors_headers(listed)["access-control-allow-origin"] == "http://app.example"
    assert g.cors_headers(evil) == {}
    # with gateway keys the key is the protection: no browser rules
    keyed = BrowserGuard.from_server(server, keyless=False)
    assert _status(keyed, "POST", _h(host="evil.example", content_type="text/plain")) == 200


def test_browser_guard_binds_to_the_bound_address() -> None:
    g = BrowserGuard.from_server(ServerSpec(), keyless=True)
    g.check("GET", _h(host="10.1.2.3:8000"), "10.1.2.3")
    with pytest.raises(GatewayError):
        g.check("GET", _h(host="10.9.9.9:8000"), "10.1.2.3")


def test_cors_preflight() -> None:
    server = msgspec.convert({"cors_origins": ["https://app.example"]}, ServerSpec)
    g = BrowserGuard.from_server(server, keyless=True)
    status, headers = g.preflight(
        _h(
            origin="https://app.example",
            access_control_request_method="POST",
            access_control_request_headers="authorization, content-type",
        )
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    status, headers = g.preflight(_h(origin="https://evil.example"))
    assert status == 403 and "access-control-allow-origin" not in headers
    bad_headers = _h(origin="https://app.example", access_control_request_headers="a\r\nb: c")
    assert "access-control-allow-headers" not in g.preflight(bad_headers)[1]


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    plain = ClientAddress.from_server(ServerSpec())
    spoof = _h(x_forwarded_for="1.2.3.4")
    assert plain.of("10.0.0.5", spoof) == "10.0.0.5"
    server = msgspec.convert({"trusted_proxies": ["10.0.0.0/8", "::1"]}, ServerSpec)
    proxied = ClientAddress.from_server(server)
    assert proxied.of("10.0.0.5", spoof) == "1.2.3.4"
    assert proxied.of("192.168.1.1", spoof) == "192.168.1.1"  # not a trusted peer
    chain = _h(x_forwarded_for="6.6.6.6, 1.2.3.4, 10.0.0.7")
    assert proxied.of("10.0.0.5", chain) == "1.2.3.4"  # right-most untrusted hop
    assert proxied.of("10.0.0.5", _h(x_forwarded_for="garbage")) == "10.0.0.5"
    with pytest.raises(ConfigError):
        ClientAddress.from_server(msgspec.convert({"trusted_proxies": ["nope"]}, ServerSpec))


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_depth_scan_agrees_with_a_parser_on_random_json() -> None:
    import random

    rng = random.Random(7)
    alphabet = ['"', "\\", "[", "]", "{", "}", "a", " ", "\n", "é", "\\n", '\\"']

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))

    def value(level: int) -> object:
        roll = rng.random()
        if level > 10 or roll < 0.3:
            return text() if roll < 0.2 else rng.randint(0, 9)
        if roll < 0.65:
            return [value(level + 1) for _ in range(rng.randint(0, 3))]
        return {text(): value(level + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(2000):
        doc = value(0)
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        for limit in (1, 3, 6):
            assert json_depth_exceeds(body, limit) == (_depth(doc) > limit), (body, limit)


def test_the_served_protocol_class_crosses_to_worker_processes() -> None:
    import pickle

    from proxy.httpproto import BoundedHttpToolsProtocol, uvicorn_options

    options = uvicorn_options(ServerSpec())
    assert pickle.loads(pickle.dumps(options["http"])) is BoundedHttpToolsProtocol
    assert options["proxy_headers"] is False


def test_a_failing_sink_never_drops_the_others(tmp_path: Path) -> None:
    from proxy.audit import AuditLog
    from proxy.observe import Observer, RequestRecord

    class Broken:
        def record(self, *args: object) -> None:
            raise RuntimeError("metrics sink down")

    audit = AuditLog(str(tmp_path / "a.jsonl"))
    observer = Observer({"m"}, audit=audit)
    observer.metrics = Broken()  # type: ignore[assignment]
    for tokens in (5, -5, 10**20, "many"):
        rec = RequestRecord("r1", "m", False, provider="p", model="x")
        rec.prompt_tokens = tokens  # type: ignore[assignment]
        observer.finished(rec)
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert observer.stats.requests_total == 4 and len(lines) == 4
    assert [line.get("prompt_tokens") for line in lines] == [5, 0, 100_000_000, None]
