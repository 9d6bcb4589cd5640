"""Test helpers shared by the test modules: configs as data, SSE reading, gateway state.

Configs are plain dicts dumped with `yaml.safe_dump` (never f-strings with doubled
braces); `start(start_gateway, config)` serves one, `write_config` writes a models.yaml
for the Python API or the CLI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from .conftest import GatewayFactory
from .servers import UvicornServer

Config = dict[str, Any]
USER: list[Any] = [{"role": "user", "content": "hello there"}]
# A breaker that never opens (for tests about something else than ejection).
NO_BREAKER: dict[str, float] = {"failures": 1_000_000, "max_cooldown": 0.001}


def dump(config: Config) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def write_config(path: Path, config: Config) -> Path:
    """`config` as a models.yaml at `path` (a folder gets `models.yaml` inside)."""
    if path.is_dir():
        path = path / "models.yaml"
    path.write_text(dump(config), encoding="utf-8")
    return path


def start(start_gateway: GatewayFactory, config: Config) -> UvicornServer:
    return start_gateway(dump(config))


def openai_provider(url: str, tag: str, **options: Any) -> Config:
    """An `openai` provider at the fake OpenAI upstream under `tag` (seen as `Seen.tag`)."""
    return {"type": "openai", "base_url": f"{url}/{tag}/v1", **options}


def entry(provider: str, model: str, **options: Any) -> Config:
    return {"provider": provider, "model": model, **options}


def chat(
    model: str, stream: bool = False, messages: list[Any] | None = None, **fields: Any
) -> Config:
    return {"model": model, "messages": messages or USER, "stream": stream, **fields}


# ---- server-sent events ----------------------------------------------------------------


def sse_data(resp: httpx.Response) -> list[str]:
    """The `data` of each event of a read response (`[DONE]` included), in order."""
    return sse_lines(resp.text)


def sse_lines(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def sse_json(resp: httpx.Response) -> list[Any]:
    """The JSON events of a stream that ended with `[DONE]` (asserted)."""
    data = sse_data(resp)
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def stream_text(events: list[Any]) -> str:
    return "".join(
        (c["choices"][0]["delta"].get("content") or "") for c in events if c.get("choices")
    )


# ---- gateway state ---------------------------------------------------------------------


def provider_state(http: httpx.Client, name: str) -> dict[str, Any]:
    """One provider's entry in `/v1/providers`."""
    data = http.get("/v1/providers").json()["data"]
    found: dict[str, Any] = next(p for p in data if p["id"] == name)
    return found


def metric(http: httpx.Client, name: str, **labels: str) -> float | None:
    """One sample of `/metrics` (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{want}}}" if labels else name
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's JSON lines written so far."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def audit_line(path: Path, request_id: str, within: float = 5.0) -> dict[str, Any]:
    """One request's audit line (lines are written in batches: waits for it)."""
    found: list[dict[str, Any]] = []

    def written() -> bool:
        found[:] = [x for x in audit_lines(path) if x["request_id"] == request_id]
        return bool(found)

    assert wait_for(written, within), f"no audit line for request {request_id}"
    return found[0]


def wait_for(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Poll `check` until it is true or time runs out; its last answer."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
