"""A new user's first hour: a busy port, readable logs, a clean shutdown, the README's commands.

The server runs as a user runs it, `python -m proxy serve` in a subprocess, in front of the
fake OpenAI upstream on loopback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import logs

from . import schemas
from .servers import free_socket, refused_port

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[str]
    stdout: str = ""
    stderr: str = ""
    stopped_after: float = 0.0  # seconds from SIGTERM to exit
    events: list[str] = field(default_factory=list)


def _config(tmp_path: Path, fake_url: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        f"""
providers:
  up: {{type: openai, base_url: "{fake_url}/up/v1"}}
  down: {{type: openai, base_url: "http://127.0.0.1:{refused_port()}/v1"}}
models:
  echo: [{{provider: down, model: x}}, {{provider: up, model: echo}}]
  long-stream: [{{provider: up, model: drip-100-100}}]
  slow: [{{provider: up, model: slow-1000}}]
""",
        encoding="utf-8",
    )
    return path


@contextmanager
def _serve(config: Path, *extra: str) -> Iterator[Served]:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    args = ["serve", "--config", str(config), "--port", str(port), *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", *args], cwd=ROOT, env=ENV, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{served.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield served
    finally:
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        served.stdout, served.stderr = proc.communicate(timeout=30)
        served.stopped_after = time.monotonic() - started


def _chat(url: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


# ---- a busy port ------------------------------------------------------------------------


def test_busy_port_is_one_line_naming_it_and_the_fix(tmp_path: Path, fake_url: str) -> None:
    taken = free_socket()
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--config", str(_config(tmp_path, fake_url)),
             "--port", str(port)],
            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        taken.close()
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0]
    assert '--port 8001 (make serve ARGS="--port 8001")' in lines[0]


# ---- log lines --------------------------------------------------------------------------


def _big_head(url: str) -> int:
    """The status of a request with more headers than server.max_headers (100)."""
    headers = {f"x-pad-{i}": "a" for i in range(150)}
    return httpx.get(f"{url}/health", headers=headers, timeout=10).status_code


def test_json_logs_are_one_object_per_line(tmp_path: Path, fake_url: str) -> None:
    """...in every worker process too; and the workers speak the bounded HTTP protocol."""
    config = _config(tmp_path, fake_url)
    with _serve(config, "--log-format", "json", "--workers", "2") as served:
        assert _chat(served.url, "echo").status_code == 200  # `down` fails first: logged
        assert _big_head(served.url) == 431
    lines = served.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line, uvicorn's too
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    loggers = {r["logger"] for r in records}
    assert {"omnimind.server", "uvicorn"} <= loggers
    assert any(
        r["logger"] == "omnimind.chain" and "attempt failed" in r["message"] for r in records
    )
    assert not any("color_message" in r for r in records)
    audit = [json.loads(line) for line in served.stdout.splitlines()]  # the audit log: stdout
    assert [a["alias"] for a in audit] == ["echo"]


def test_text_logs_are_one_format_for_ours_and_uvicorns(tmp_path: Path, fake_url: str) -> None:
    with _serve(_config(tmp_path, fake_url)) as served:
        assert _chat(served.url, "echo").status_code == 200
        assert _big_head(served.url) == 431  # proxy/httpproto.py's bounds are in force
    lines = served.stderr.strip().splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), served.stderr
    assert any(" INFO uvicorn: " in line for line in lines)
    assert any(" INFO omnimind.server: serving " in line for line in lines)
    assert "Traceback" not in served.stderr


def test_provider_down_and_back_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    states = logs.ProviderStates()
    with caplog.at_level(logging.INFO, logger="omnimind.providers"):
        for _ in range(50):  # every request while it is down: one line
            states.observe("ollama", "open", "connect_error")
        states.observe("ollama", "half_open")  # a probe: still down, nothing new
        states.observe("ollama", "open", "connect_error")
        for _ in range(3):
            states.observe("ollama", "closed")
        states.observe("openrouter", "closed")  # never down: nothing
    assert [r.getMessage() for r in caplog.records] == [
        "provider ollama down (circuit open): connect_error",
        "provider ollama back (circuit closed)",
    ]
    assert [getattr(r, "circuit", None) for r in caplog.records] == ["open", "closed"]
    assert not states.is_down("ollama")


def test_json_formatter_keeps_extra_fields_and_tracebacks() -> None:
    formatter = logs.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("omnimind.x").makeRecord(
            "omnimind.x", logging.ERROR, __file__, 1, "failed %s", ("once",), sys.exc_info(),
            extra={"request_id": "r1"},
        )  # fmt: skip
    line = formatter.format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed once" and data["request_id"] == "r1"
    assert data["level"] == "error" and "ValueError: boom" in data["error"]


def test_no_progress_bars_in_the_servers_logs() -> None:
    code = "import os; from proxy import logs; logs.configure(); print(os.environ['{}'])"
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        env = {k: v for k, v in ENV.items() if k != key}
        out = subprocess.run(
            [sys.executable, "-c", code.format(key)], env=env, capture_output=True, text=True,
            timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert out.stdout.strip() == "1", out.stderr
    formatter = logs.dict_config("json", "info")["formatters"]["omnimind"]["()"]
    assert formatter == "proxy.logs.JsonFormatter"
    with pytest.raises(ValueError, match="text, json"):
        logs.dict_config("yaml")


# ---- shutdown ---------------------------------------------------------------------------


def _stream_in_thread(served: Served) -> threading.Thread:
    def read() -> None:
        body = {
            "model": "long-stream",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
        try:
            with httpx.stream(
                "POST", f"{served.url}/v1/chat/completions", json=body, timeout=30
            ) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        served.events.append(line.removeprefix("data: "))
        except httpx.HTTPError as exc:
            served.events.append(f"cut: {type(exc).__name__}")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not served.events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served.events, "the stream did not start"
    return thread


def test_shutdown_lets_requests_in_flight_finish_within_the_grace(
    tmp_path: Path, fake_url: str
) -> None:
    answers: list[int] = []

    def call() -> None:
        answers.append(_chat(served.url, "slow").status_code)

    with _serve(_config(tmp_path, fake_url), "--shutdown-grace", "5") as served:
        slow = threading.Thread(target=call)
        slow.start()
        time.sleep(0.3)  # the request is at the upstream (1 s) when the signal comes
        served.proc.send_signal(signal.SIGTERM)
        slow.join(timeout=10)
    assert answers == [200]
    assert served.stopped_after < 5  # it left when the work was done, not at the grace's end
    assert "Traceback" not in served.stderr


def test_shutdown_ends_open_streams_with_an_error_event(tmp_path: Path, fake_url: str) -> None:
    with _serve(_config(tmp_path, fake_url), "--shutdown-grace", "1") as served:
        reader = _stream_in_thread(served)  # 100 chunks 100 ms apart: outlives the grace
        served.proc.send_signal(signal.SIGTERM)
        reader.join(timeout=15)
    assert served.stopped_after < 5
    assert "Traceback" not in served.stderr
    last = served.events[-1]
    assert not last.startswith("cut:"), served.events[-3:]
    schemas.error(json.loads(last))


# ---- /metrics --------------------------------------------------------------------------


def test_metrics_content_type_names_its_charset_once(start_gateway: Any, fake_url: str) -> None:
    gateway = start_gateway(
        f'providers:\n  up: {{type: openai, base_url: "{fake_url}/up/v1"}}\n'
        "models:\n  m: [{provider: up, model: echo}]\n"
    )
    resp = httpx.get(f"{gateway.url}/metrics")
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


# ---- the README's commands --------------------------------------------------------------


def test_readme_documents_the_first_hour() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("check", "models", "check-install"):
        assert f"make {target}" in readme and re.search(rf"^{target}:", makefile, re.M)
    assert 'make serve ARGS="--port 8001"' in readme
    assert "--log-format json" in readme and "--shutdown-grace" in readme
    assert "work too" not in readme  # tools / structured output need a capable upstream
