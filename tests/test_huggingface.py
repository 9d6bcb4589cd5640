"""The HuggingFace adapter end to end: official `openai` SDK -> real gateway -> transformers.

Most tests serve a tiny random Llama (tests/tiny_model.py) with SmolLM2's real tokenizer;
one slow test serves the real SmolLM2 GGUF. The fake OpenAI upstream stands behind the
local model in a chain, to show fallbacks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.config import Entry, ProviderConfig
from proxy.providers.base import Call
from proxy.providers.hf_provider import HuggingFaceProvider
from proxy.providers.hf_worker import GENERATE_THREAD
from proxy.providers.huggingface import Spec as HuggingFaceSpec
from proxy.wire import ChatRequest

from . import schemas
from .conftest import GatewayFactory
from .fake_openai import FakeOpenAI
from .servers import UvicornServer, settle

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me something."}]
LONG = 4000  # max_tokens for a generation that runs until it is stopped (~15 s)


def _config(tiny_dir: Path, fake_url: str, broken_gguf_dir: Path) -> str:
    tiny = f"{{provider: hf, model: '{tiny_dir}'}}"
    echo = "{provider: backup, model: echo}"
    return f"""
providers:
  hf:
    type: huggingface
    max_concurrency: 1
    max_queue: 1
    max_new_tokens: 12
    breaker: {{failures: 1000000, max_cooldown: 0.001}}
  backup:
    type: openai
    base_url: {fake_url}/backup/v1
    api_key: sk-backup
models:
  tiny:
    - {tiny}
  tiny-or-echo:
    - {tiny}
    - {echo}
  missing-dir:
    - {{provider: hf, model: /nonexistent/omnimind-weights}}
    - {echo}
  missing-package:
    - {{provider: hf, model: "package:omnimind_no_such_package"}}
    - {echo}
  broken-gguf:
    - {{provider: hf, model: '{broken_gguf_dir}', gguf_file: broken.gguf}}
    - {echo}
  uncached-hub-id:
    - {{provider: hf, model: omnimind-tests/no-such-model}}
    - {echo}
"""


@pytest.fixture(scope="module")
def gw(
    start_gateway: GatewayFactory, tiny_dir: Path, fake_url: str, tmp_path_factory: Any
) -> UvicornServer:
    broken = tmp_path_factory.mktemp("broken")
    (broken / "broken.gguf").write_bytes(b"this is not a gguf file")
    return start_gateway(_config(tiny_dir, fake_url, broken))


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def http(gw: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=60) as c:
        yield c


def _rows(http: httpx.Client) -> int:
    """Rows the local model's worker is decoding now (its counters in /v1/providers)."""
    providers = http.get("/v1/providers").json()["data"]
    local = next(p["local"] for p in providers if p["id"] == "hf")
    return sum(int(m["active"]) for m in local["models"].values())


def _workers() -> int:
    return sum(t.name == GENERATE_THREAD for t in threading.enumerate())


def _prompt_tokens(tokenizer: Any, messages: list[Any]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _events(text: str) -> list[Any]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _stream_text(client: openai.OpenAI, **kwargs: Any) -> tuple[str, str | None]:
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **kwargs)
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


# ---- answers -----------------------------------------------------------------------------


def test_non_stream_answer_is_openai_shaped(
    http: httpx.Client, client: openai.OpenAI, tokenizer: Any
) -> None:
    resp = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES})
    assert resp.status_code == 200
    assert resp.headers["x-omnimind-provider"] == "hf"
    body = resp.json()
    schemas.completion(body)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"  # max_new_tokens (12) from the spec
    assert body["usage"] == {
        "prompt_tokens": _prompt_tokens(tokenizer, MESSAGES),
        "completion_tokens": 12,
        "total_tokens": _prompt_tokens(tokenizer, MESSAGES) + 12,
    }
    answer = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5)
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.choices[0].finish_reason == "length"


def test_stream_is_openai_shaped_with_usage(http: httpx.Client, tokenizer: Any) -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 7,
    }
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = _events(resp.text)
    for chunk in chunks:
        schemas.chunk(chunk)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    prompt = _prompt_tokens(tokenizer, MESSAGES)
    assert chunks[-1]["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 7,
        "total_tokens": prompt + 7,
    }
    without = _events(http.post("/v1/chat/completions", json={**body, "stream_options": None}).text)
    assert all(c["choices"] for c in without)  # no usage chunk unless asked for


def test_stream_and_non_stream_agree_token_for_token(client: openai.OpenAI) -> None:
    """Sampled gibberish (any byte sequence) decodes the same streamed and whole."""
    options: dict[str, Any] = {"temperature": 1.0, "seed": 11, "max_tokens": 40}
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, **options)
    streamed, finish = _stream_text(client, **options)
    assert streamed == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == "length"


def test_seed_reproduces_a_sampled_answer(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        answer = client.chat.completions.create(
            model="tiny", messages=MESSAGES, temperature=1.0, top_p=0.95, seed=seed, max_tokens=20
        )
        return answer.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_answer(client: openai.OpenAI, stream: bool) -> None:
    options: dict[str, Any] = {"temperature": 1.0, "seed": 5, "max_tokens": 30}
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, **options)
    text = full.choices[0].message.content or ""
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    expected = text[: text.find(stop)]
    if stream:
        got, finish = _stream_text(client, stop=[stop, "never-seen-stop"], **options)
    else:
        answer = client.chat.completions.create(
            model="tiny", messages=MESSAGES, stop=[stop, "never-seen-stop"], **options
        )
        got, finish = answer.choices[0].message.content or "", answer.choices[0].finish_reason
        assert answer.usage is not None and answer.usage.completion_tokens < 30
    assert got == expected
    assert finish == "stop"


# ---- requests the adapter refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": []},
        {"temperature": 5},
        {"top_p": 1.5},
    ],
)
def test_wrong_requests_are_client_errors(
    http: httpx.Client, fake: FakeOpenAI, change: dict[str, Any]
) -> None:
    before = len(fake.calls("backup"))
    body = {"model": "tiny-or-echo", "messages": MESSAGES, **change}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    schemas.error(resp.json())
    assert len(fake.calls("backup")) == before  # never retried elsewhere


def test_unsupported_but_valid_request_falls_back(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-or-echo", messages=MESSAGES, n=2
    )
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-fallbacks"] == "hf:unsupported"


# ---- loading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias", ["missing-dir", "missing-package", "broken-gguf", "uncached-hub-id"]
)
def test_load_failure_falls_back_and_is_remembered(
    client: openai.OpenAI, alias: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="omnimind.huggingface")
    for stream in (False, True, False):
        raw = client.chat.completions.with_raw_response.create(
            model=alias, messages=MESSAGES, stream=stream
        )
        assert raw.headers["x-omnimind-provider"] == "backup"
        assert raw.headers["x-omnimind-fallbacks"] == "hf:unavailable"
    failures = [r for r in caplog.records if r.getMessage().startswith("cannot load model")]
    assert len(failures) == 1  # later calls fail fast with the remembered error


async def test_concurrent_first_requests_share_one_load(
    start_gateway: GatewayFactory, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="omnimind.huggingface")
    gw = start_gateway(f"""
        providers:
          local: {{type: huggingface, max_concurrency: 4}}
        models:
          tiny: [{{provider: local, model: '{tiny_dir}'}}]
        """)
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
        answers = await asyncio.gather(*(
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
            for _ in range(4)
        ))  # fmt: skip
    assert all(a.usage and a.usage.completion_tokens == 4 for a in answers)
    status = await asyncio.to_thread(httpx.get, f"{gw.url}/v1/providers")
    providers = status.json()["data"]
    assert next(p["local"]["loads"] for p in providers if p["id"] == "local") == 1


def test_preload_loads_before_the_first_request(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="omnimind.huggingface")
    provider = HuggingFaceProvider(ProviderConfig("local", HuggingFaceSpec(preload=True)))
    entry = Entry("local", str(tiny_dir), 60.0, 5.0, 60.0)
    provider.preload([entry, entry, Entry("elsewhere", "other-model", 60.0, 5.0, 60.0)])

    async def use() -> bytes:
        loaded = await provider.load(entry)
        assert loaded.load_seconds > 0
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 3}
        answer = await provider.complete(Call(ChatRequest(json.dumps(body).encode()), entry))
        await provider.aclose()
        return answer.body

    assert json.loads(asyncio.run(use()))["usage"]["completion_tokens"] == 3
    assert provider.loads == 1  # one model, loaded once


_EXIT_MID_LOAD = """
import sys, time
from proxy.config import Entry, ProviderConfig
from proxy.providers.hf_provider import HuggingFaceProvider
from proxy.providers.huggingface import Spec
provider = HuggingFaceProvider(ProviderConfig("local", Spec(preload=True)))
provider.preload([Entry("local", sys.argv[1], 60.0, 5.0, 60.0)])
time.sleep(float(sys.argv[2]))
"""


def test_a_process_that_exits_while_a_model_loads_exits_cleanly(tiny_dir: Path) -> None:
    """A daemon load thread stopped inside torch or safetensors at exit aborted the process
    (std::terminate, status 134): Ctrl-C while `make serve` preloads. Exit waits for it."""
    root = Path(__file__).resolve().parents[1]
    for delay in ("0", "0.01", "0.03", "0.06", "0.1", "0.2"):
        done = subprocess.run(
            [sys.executable, "-c", _EXIT_MID_LOAD, str(tiny_dir), delay],
            cwd=root, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert (done.returncode, "terminate" in done.stderr) == (0, False), done.stderr[-500:]


# ---- cancellation, queueing, liveness ------------------------------------------------------


def test_closing_a_stream_stops_generation(client: openai.OpenAI, http: httpx.Client) -> None:
    settle(lambda: _rows(http), 0)  # earlier tests' rows have ended
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, max_tokens=LONG
    )
    for n, _ in enumerate(stream):
        if n == 5:
            break
    assert _rows(http) == 1
    stream.close()
    assert settle(lambda: _rows(http), 0, within=5) == 0
    started = time.monotonic()
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert time.monotonic() - started < 3  # the model is free again at once


def test_client_gone_stops_a_non_stream_generation(gw: UvicornServer, http: httpx.Client) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=1.0)
    assert settle(lambda: _rows(http), 0, within=5) == 0


def test_full_queue_falls_back(client: openai.OpenAI, http: httpx.Client) -> None:
    """max_concurrency 1, max_queue 1: one runs, one waits, the third goes down the chain."""
    running = client.chat.completions.create(
        model="tiny-or-echo", messages=MESSAGES, stream=True, max_tokens=LONG
    )
    next(iter(running))
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            client.chat.completions.with_raw_response.create(
                model="tiny-or-echo", messages=MESSAGES, max_tokens=3
            )
        )
    )
    waiter.start()
    deadline = time.monotonic() + 5
    while _queued(http) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _queued(http) == 1
    raw = client.chat.completions.with_raw_response.create(model="tiny-or-echo", messages=MESSAGES)
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-fallbacks"] == "hf:queue_full"
    assert raw.parse().choices[0].message.content == "echo: Tell me something."
    running.close()
    waiter.join(10)
    assert queued[0].headers["x-omnimind-provider"] == "hf"


def _queued(http: httpx.Client) -> int:
    providers = http.get("/v1/providers").json()["data"]
    return int(next(p["queued"] for p in providers if p["id"] == "hf"))


def test_health_stays_fast_while_generating(client: openai.OpenAI, http: httpx.Client) -> None:
    settle(lambda: _rows(http), 0)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, stream=True, max_tokens=LONG
    )
    next(iter(stream))
    slowest = 0.0
    for _ in range(20):
        started = time.perf_counter()
        assert http.get("/health").status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
    assert _rows(http) == 1  # the generation was running all along
    stream.close()
    assert slowest < 0.5
