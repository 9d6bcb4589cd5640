"""Continuous batching of local generation (`max_batch`), through the gateway and the SDK.

Two providers serve the same tiny model: `solo` one request at a time, `batch` with
`max_batch: 4`. A long "blocker" stream keeps the batching model decoding while the
requests under test arrive, so they join its batch between two steps. Each batched answer
must match the same request answered alone: text, finish reason and usage. Batch widths
and joins are read from the worker's counters in `/v1/providers`, never from the log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import GatewayFactory
from .servers import UvicornServer, settle
from .tiny_model import build_tiny_model

PROMPTS = ["Tell me about cats.", "Describe the sea.", "What is Paris?", "Count to ten."]


@pytest.fixture(scope="module")
def wordy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose greedy answers differ by prompt, so a mix-up between rows shows."""
    return build_tiny_model(tmp_path_factory.mktemp("wordy-llama"), init_range=0.3)


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, wordy_dir: Path) -> UvicornServer:
    return start_gateway(f"""
providers:
  solo: {{type: huggingface, max_new_tokens: 12}}
  batch: {{type: huggingface, max_concurrency: 8, max_batch: 4, max_new_tokens: 12}}
models:
  solo: [{{provider: solo, model: '{wordy_dir}'}}]
  batch: [{{provider: batch, model: '{wordy_dir}'}}]
""")


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def stats(gw: UvicornServer) -> Any:
    """The batching model's worker counters now (`/v1/providers`, provider `batch`)."""

    def read() -> dict[str, Any]:
        providers = httpx.get(f"{gw.url}/v1/providers", timeout=10).json()["data"]
        local = next(p["local"] for p in providers if p["id"] == "batch")
        return dict(next(iter(local["models"].values())))

    return read


@contextmanager
def _busy(client: openai.OpenAI) -> Iterator[None]:
    """Keep the batching model generating (one long stream) while the block runs."""
    streaming = threading.Event()

    def run() -> None:
        stream = client.chat.completions.create(
            model="batch", messages=[{"role": "user", "content": "Go on."}], max_tokens=500,
            stream=True,
        )  # fmt: skip
        for _ in stream:
            streaming.set()

    blocker = threading.Thread(target=run)
    blocker.start()
    assert streaming.wait(60)
    try:
        yield
    finally:
        blocker.join(120)


def _ask(client: openai.OpenAI, model: str, prompt: str, **options: Any) -> Any:
    messages = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model=model, messages=messages, **options)


def _together(client: openai.OpenAI, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The requests sent at once to the batching model while it is busy."""
    with _busy(client), ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(_ask, client, "batch", p, **o) for p, o in requests]
        return [f.result(timeout=120) for f in futures]


def _same(batched: Any, alone: Any) -> None:
    b, a = batched.choices[0], alone.choices[0]
    assert (b.message.content, b.finish_reason) == (a.message.content, a.finish_reason)
    assert batched.usage.prompt_tokens == alone.usage.prompt_tokens
    assert batched.usage.completion_tokens == alone.usage.completion_tokens


def test_waiting_requests_share_a_batch_and_answer_as_alone(
    client: openai.OpenAI, stats: Any
) -> None:
    budgets = [12, 12, 5, 9]  # each row keeps its own max_tokens
    requests = [
        (p, {"max_tokens": n, "temperature": 0}) for p, n in zip(PROMPTS, budgets, strict=True)
    ]
    alone = [_ask(client, "solo", p, **o) for p, o in requests]
    batched = _together(client, requests)
    assert stats()["widest"] == 4  # max_batch: the blocker and three, then the fourth
    for b, a in zip(batched, alone, strict=True):
        _same(b, a)
    assert [b.usage.completion_tokens for b in batched] == budgets  # random weights: no EOS
    assert {b.choices[0].finish_reason for b in batched} == {"length"}
    assert len({b.choices[0].message.content for b in batched}) == 4  # four different answers


def test_a_request_joins_a_running_batch(client: openai.OpenAI, stats: Any) -> None:
    """Continuous batching: a request that arrives mid-decode joins at the next step."""
    alone = _ask(client, "solo", PROMPTS[2], max_tokens=12, temperature=0)
    before = stats()
    with _busy(client):
        joined = _ask(client, "batch", PROMPTS[2], max_tokens=12, temperature=0)
        during = stats()
    assert during["joined"] == before["joined"] + 1  # it did not wait for the blocker's end
    _same(joined, alone)


def test_stop_strings_and_budgets_per_row(client: openai.OpenAI, stats: Any) -> None:
    full = _ask(client, "solo", PROMPTS[0], max_tokens=12, temperature=0).choices[0].message
    text = full.content or ""
    # a stop string from the second half, that does not occur earlier
    stop = next(
        c
        for c in (text[i : i + 2] for i in range(len(text) // 2, len(text) - 1))
        if c.strip() == c and text.find(c) > 0
    )
    cut = text.find(stop)
    requests = [
        (PROMPTS[0], {"max_tokens": 12, "temperature": 0, "stop": [stop]}),
        (PROMPTS[1], {"max_tokens": 12, "temperature": 0}),
    ]
    joined = stats()["joined"]
    stopped, other = _together(client, requests)
    assert stats()["joined"] == joined + 2
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    _same(other, _ask(client, "solo", PROMPTS[1], max_tokens=12, temperature=0))


def test_seeded_requests_share_a_batch_and_still_reproduce(
    client: openai.OpenAI, stats: Any
) -> None:
    """Each seeded row samples from its own generator: its neighbours cannot change it."""
    options = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    requests = [(PROMPTS[0], options), (PROMPTS[1], options)]
    joined = stats()["joined"]
    batched = _together(client, requests)
    assert stats()["joined"] == joined + 2
    for (prompt, opts), b in zip(requests, batched, strict=True):
        _same(b, _ask(client, "solo", prompt, **opts))


def test_a_stream_that_leaves_ends_its_row_only(client: openai.OpenAI, stats: Any) -> None:
    alone = _ask(client, "solo", PROMPTS[1], max_tokens=40, temperature=0)
    results: dict[str, Any] = {}

    def leaver() -> None:
        stream = client.chat.completions.create(
            model="batch", messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=4000, temperature=0, stream=True,
        )  # fmt: skip
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()
        results["left"] = True

    def stayer() -> None:
        results["stayed"] = _ask(client, "batch", PROMPTS[1], max_tokens=40, temperature=0)

    with _busy(client):
        threads = [threading.Thread(target=leaver), threading.Thread(target=stayer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results["left"]
    _same(results["stayed"], alone)
    assert settle(lambda: stats()["active"], 0, within=10) == 0  # the 4000-token row stopped
