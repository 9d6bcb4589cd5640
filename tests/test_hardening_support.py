"""Shared pieces of the hardening tests: a gateway served with the hardened uvicorn options
(as `serve` runs it), the canary secrets and their config, and the malicious upstreams."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from proxy.app import create_app
from proxy.config import load
from proxy.httpproto import uvicorn_options

from .fake_malicious import FakeMalicious, Sink
from .servers import AiohttpServer, LoopThread, free_socket

CANARY = "sk-hard-canary-0a1b2c3d4e"  # the provider's api_key
HEADER_CANARY = "hdr-hard-canary-5f6a7b8c"  # a custom x-api-key header
CUSTOM_CANARY = "cus-hard-canary-9d0e1f2a"  # "X-Custom-Auth: Token <it>"
GATEWAY_CANARY = "gw-hard-canary-3b4c5d6e"  # the gateway's own api key
CANARIES = (CANARY, HEADER_CANARY, CUSTOM_CANARY, GATEWAY_CANARY)
ENV = {
    "HARD_CANARY": CANARY,
    "HARD_HEADER": HEADER_CANARY,
    "HARD_CUSTOM": CUSTOM_CANARY,
    "HARD_GATEWAY": GATEWAY_CANARY,
}

BEHAVIOURS = [
    "echo", "redirect-301", "redirect-302", "redirect-303", "redirect-307", "redirect-308",
    "gzip-bomb", "huge", "echo-error-400", "echo-error-401", "echo-error-422",
    "echo-error-500", "echo-error-stream", "error-200", "partial", "silent",
    "usage-negative", "usage-huge", "usage-string",
]  # fmt: skip


def leaked(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [c for c in CANARIES if c in text]


class OptionsServer:
    """An ASGI app on a real uvicorn (uvloop, loopback) with the given uvicorn options."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self._sock = free_socket()
        self.port = int(self._sock.getsockname()[1])
        options.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, loop="none", **options))
        self.thread = LoopThread(uvloop_=True)
        self._serving = asyncio.run_coroutine_threadsafe(
            self.server.serve(sockets=[self._sock]), self.thread.loop
        )
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self._serving.done() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def close(self) -> None:
        self.server.should_exit = True
        self._serving.result(15)
        self.thread.stop()
        self._sock.close()


class GatewayServer(OptionsServer):
    """The gateway from a models.yaml file, with `uvicorn_options` applied (as `serve`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        config = load(path)
        super().__init__(create_app(config), lifespan="on", **uvicorn_options(config.server))

    @property
    def gateway(self) -> Any:
        return self.app.gateway


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def one_alias_config(mal_url: str, server: str, alias: str = "m", model: str = "echo") -> str:
    """One openai provider `mal` at the malicious upstream, one alias; `server` is the
    inside of the server mapping."""
    return f"""
server: {{{server}}}
providers:
  mal: {{type: openai, base_url: "{mal_url}/v1"}}
models:
  {alias}: [{{provider: mal, model: {model}}}]
"""


def malicious_config(mal_url: str, audit: Path | str = "off", server: str = "") -> str:
    aliases = "\n".join(
        f"  m-{b}: [{{provider: mal, model: {b}}}]\n"
        f"  fb-{b}: [{{provider: mal, model: {b}}}, {{provider: backup, model: echo}}]"
        for b in BEHAVIOURS
    )
    return f"""
server:
  audit_log: {audit}
  api_keys: ["${{HARD_GATEWAY}}"]
  request_timeout: 20
  {server}
providers:
  mal:
    type: openai
    base_url: {mal_url}/v1
    api_key: ${{HARD_CANARY}}
    headers: {{x-api-key: "${{HARD_HEADER}}", X-Custom-Auth: "Token ${{HARD_CUSTOM}}"}}
    timeout: 3
    first_token_timeout: 3
    breaker: {{failures: 1000000, max_cooldown: 0.001}}
  backup:
    type: openai
    base_url: {mal_url}/v1
    breaker: {{failures: 1000000, max_cooldown: 0.001}}
models:
{aliases}
"""


@pytest.fixture(scope="module")
def canary_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def sink() -> Iterator[tuple[Sink, str]]:
    recorder = Sink()
    server = AiohttpServer(recorder.app())
    yield recorder, server.url
    server.close()


@pytest.fixture(scope="module")
def mal(sink: tuple[Sink, str]) -> Iterator[tuple[FakeMalicious, str]]:
    fake = FakeMalicious(sink_url=sink[1])
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


def audit_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
