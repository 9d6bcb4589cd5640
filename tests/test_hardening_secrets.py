"""A malicious upstream (tests/fake_malicious.py) behind a real gateway, driven by the
official openai client: no canary secret on any surface, no redirect followed, no
upstream body unbounded, no absurd usage booked."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .fake_malicious import FakeMalicious, Sink
from .test_hardening_support import (
    CANARY,
    GATEWAY_CANARY,
    HEADER_CANARY,
    GatewayServer,
    audit_lines,
    canary_env,  # noqa: F401 - a fixture
    leaked,
    mal,  # noqa: F401 - a fixture
    malicious_config,
    rss_kb,
    sink,  # noqa: F401 - a fixture
    write_config,
)

MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def gw(
    canary_env: None,  # noqa: F811
    mal: tuple[FakeMalicious, str],  # noqa: F811
    audit_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayServer]:
    path = tmp_path_factory.mktemp("cfg") / "models.yaml"
    server = GatewayServer(write_config(path, malicious_config(mal[1], audit_path)))
    yield server
    server.close()


@pytest.fixture
def client(gw: GatewayServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=GATEWAY_CANARY, max_retries=0, timeout=30
    ) as c:
        yield c


def _ask(client: openai.OpenAI, model: str, stream: bool) -> tuple[int, str]:
    """Status and everything the client got (body and headers)."""
    try:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model=model, messages=MESSAGES, stream=True
            ) as resp:
                return resp.status_code, str(resp.headers) + resp.read().decode()
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
        return raw.status_code, str(raw.headers) + raw.http_response.text
    except openai.APIStatusError as exc:
        return exc.status_code, str(exc.response.headers) + exc.response.text


def test_the_fake_is_honest_to_the_official_client(
    mal: tuple[FakeMalicious, str],  # noqa: F811
) -> None:
    with openai.OpenAI(base_url=f"{mal[1]}/v1", api_key=CANARY, max_retries=0) as direct:
        answer = direct.chat.completions.create(model="echo", messages=MESSAGES)
        assert answer.choices[0].message.content == "echo"
        chunks = list(direct.chat.completions.create(model="echo", messages=MESSAGES, stream=True))
        assert chunks[0].choices[0].delta.content == "echo"
        with pytest.raises(openai.BadRequestError) as err:
            direct.chat.completions.create(model="echo-error-400", messages=MESSAGES)
        assert CANARY in str(err.value)  # it does echo the key: the gateway must not


SURFACE_MODELS = [
    "m-echo-error-400", "m-echo-error-401", "m-echo-error-422", "m-echo-error-500",
    "m-echo-error-stream", "m-error-200", "fb-echo-error-500", "fb-echo-error-stream",
    "fb-error-200", "m-redirect-307", "m-nope-unknown",
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", SURFACE_MODELS)
def test_no_secret_reaches_the_client(client: openai.OpenAI, model: str, stream: bool) -> None:
    status, everything = _ask(client, model, stream)
    assert not leaked(everything), (status, everything[:2000])


def test_no_secret_in_providers_status(client: openai.OpenAI, gw: GatewayServer) -> None:
    for model in SURFACE_MODELS:
        _ask(client, model, False)
        text = httpx.get(
            f"{gw.url}/v1/providers", headers={"authorization": f"Bearer {GATEWAY_CANARY}"}
        ).text
        assert not leaked(text), (model, text)


def test_no_secret_in_audit_metrics_or_server_log(
    client: openai.OpenAI, gw: GatewayServer, audit_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for model in SURFACE_MODELS:
        for stream in (False, True):
            _ask(client, model, stream)
    gw.gateway.observer.audit.flush()
    assert len(audit_lines(audit_path)) >= 2 * len(SURFACE_MODELS)
    assert not leaked(audit_path.read_text())
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert not leaked(metrics)
    # the gateway's side of the log (the openai client logs in this process too)
    ours = [r for r in caplog.records if r.name.startswith(("omnimind", "uvicorn", "litestar"))]
    assert ours  # the failed attempts were logged...
    server_log = "\n".join(caplog.handler.format(r) for r in ours)
    assert not leaked(server_log)  # ...masked
    for record in ours:  # and upstream text cannot forge a line: one record, one line
        assert "\n" not in record.getMessage(), record.getMessage()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_never_followed(
    client: openai.OpenAI,
    sink: tuple[Sink, str],  # noqa: F811
    code: int,
) -> None:
    hits = len(sink[0].hits)
    raw = client.chat.completions.with_raw_response.create(
        model=f"fb-redirect-{code}", messages=MESSAGES
    )
    assert raw.parse().choices[0].message.content == "echo"  # the chain moved on
    assert raw.headers["x-omnimind-fallbacks"] == "mal:redirect"
    assert len(sink[0].hits) == hits, sink[0].hits[-1]
    for stream in (False, True):  # a lone entry: the redirect is the error, never followed
        status, text = _ask(client, f"m-redirect-{code}", stream)
        assert status == 502 and "redirect" in text
    assert len(sink[0].hits) == hits


@pytest.mark.parametrize("model", ["m-gzip-bomb", "m-huge"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_bodies_are_bounded(
    client: openai.OpenAI,
    mal: tuple[FakeMalicious, str],  # noqa: F811
    model: str,
    stream: bool,
) -> None:
    _ = mal[0].bomb  # built before measuring
    before = rss_kb()
    started = time.monotonic()
    status, _text = _ask(client, model, stream)
    assert time.monotonic() - started < 15
    assert status in (200, 502)  # a stream may have committed before the cap: then an error event
    assert rss_kb() - before < 100 * 1024  # the bomb inflates to 256 MB; the cap is far below
    assert mal[0].sent_bytes < 200 * 1024 * 1024


@pytest.mark.parametrize("kind", ["negative", "huge"])
def test_absurd_usage_is_clamped_and_every_sink_still_records(
    client: openai.OpenAI, gw: GatewayServer, audit_path: Path, kind: str
) -> None:
    stats = gw.gateway.observer.stats
    before = stats.requests_total
    seen = len(audit_lines(audit_path))
    raw = client.chat.completions.with_raw_response.create(
        model=f"m-usage-{kind}", messages=MESSAGES
    )
    assert raw.status_code == 200
    assert float(raw.headers.get("x-omnimind-cost-usd", 0)) >= 0
    gw.gateway.observer.audit.flush()
    lines = audit_lines(audit_path)[seen:]
    assert len(lines) == 1 and 0 <= lines[0].get("prompt_tokens", 0) <= 100_000_000
    assert stats.requests_total == before + 1
    metrics = httpx.get(f"{gw.url}/metrics").text
    tokens = [ln for ln in metrics.splitlines() if ln.startswith("omnimind_tokens_total{")]
    assert all(0 <= float(ln.rsplit(" ", 1)[1]) <= 1e9 for ln in tokens), tokens


def test_client_strings_are_cut_in_the_audit_log(
    client: openai.OpenAI, gw: GatewayServer, audit_path: Path
) -> None:
    seen = len(audit_lines(audit_path))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="x" * 200_000, messages=MESSAGES)
    gw.gateway.observer.audit.flush()
    text = audit_path.read_text().splitlines()[seen:]
    assert len(text) == 1 and len(text[0]) < 4096


def test_secret_header_values_are_masked_whatever_their_name(gw: GatewayServer) -> None:
    redactor = gw.gateway.redactor
    assert redactor.text(f"got {HEADER_CANARY} and Token x") == "got ******** and Token x"
