"""Legacy text completions: OpenAI's request checks, the fakes checked with the official
clients, and Ollama's /api/generate translated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from proxy import upstream
from proxy.completions import (
    DEFAULT_MAX_TOKENS,
    CompletionRequest,
    parse_completion_request,
    translatable,
)
from proxy.config import Entry
from proxy.errors import InvalidRequest, UpstreamError
from proxy.providers.ollama_ops import OllamaOps

from . import schemas
from .fake_ollama import FakeOllama
from .fake_openai import FakeOpenAI
from .servers import AiohttpServer, refused_port


def _request(**fields: Any) -> CompletionRequest:
    return parse_completion_request(json.dumps({"model": "m", **fields}).encode())


def text_completion(obj: dict[str, Any]) -> dict[str, Any]:
    """Checked against OpenAI's CreateCompletionResponse. Stream chunks are that shape too,
    but say `finish_reason: null` until the last (as OpenAI's own stream does, though the
    schema lists only strings): such a chunk is checked with its final reason filled in."""
    filled = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in obj["choices"]]
    schemas.text_completion({**obj, "choices": filled})
    return obj


# ---- the request as OpenAI checks it -----------------------------------------------------------


def test_prompt_shapes() -> None:
    assert _request(prompt="hi").prompts == ["hi"]
    assert _request(prompt="").prompts == [""]  # OpenAI allows an empty prompt
    assert _request(prompt=["a", "b"]).prompts == ["a", "b"]
    assert _request(prompt=[1, 2]).prompts == [[1, 2]]
    assert _request(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]
    streamed = _request(prompt="x", stream=True, stream_options={"include_usage": True})
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({}, "prompt", "Missing required parameter: 'prompt'"),
        ({"prompt": []}, "prompt", "must be a string"),
        ({"prompt": ["a", 1]}, "prompt", "must not mix"),
        ({"prompt": [[1], []]}, "prompt", "'prompt[1]' must be a non-empty array"),
        ({"prompt": {"a": 1}}, "prompt", "must be a string"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens", "at least 0"),
        ({"prompt": "x", "temperature": 3}, "temperature", "between 0 and 2"),
        ({"prompt": "x", "n": 0}, "n", "between 1 and 128"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "between 0 and 5"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "x", "best_of": 2, "stream": True}, "best_of", "cannot be used with"),
        ({"prompt": "x", "best_of": 1, "n": 2}, "best_of", "at least 'n'"),
        ({"prompt": "x", "echo": "yes"}, "echo", "Expected `bool"),
        ({"prompt": "x", "model": 3}, "model", "Expected `str"),
    ],
)
def test_bad_requests_are_400s(fields: dict[str, Any], param: str, needle: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        _request(**fields)
    assert needle in err.value.message and err.value.param == param


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 0}, "logprobs"),
        ({"best_of": 3}, "best_of"),
        ({"n": 2}, "n"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
    ],
)
def test_what_a_raw_prompt_provider_cannot_honour(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UpstreamError) as err:
        translatable(_request(**{"prompt": "x", **fields}), "Ollama", tokens=False)
    assert err.value.reason == "unsupported" and err.value.param == param
    assert "Ollama cannot honour" in err.value.message


def test_raw_prompt_defaults() -> None:
    raw = translatable(_request(prompt="x", stop="\n", echo=True, best_of=1), "o", tokens=False)
    assert raw.max_tokens == DEFAULT_MAX_TOKENS and raw.stops == ("\n",) and raw.echo
    assert translatable(_request(prompt=[5, 6]), "local", tokens=True).prompt == [5, 6]


# ---- the OpenAI fake is faithful: the official client accepts it -----------------------------


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


def test_official_openai_client_completes_with_the_fake(
    openai_fake: tuple[FakeOpenAI, str],
) -> None:
    with openai.OpenAI(base_url=f"{openai_fake[1]}/up/v1", api_key="k", max_retries=0) as client:
        _official_completions(client)


def _official_completions(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="echo", prompt="say hi")
    assert answer.choices[0].text == "echo: say hi" and answer.object == "text_completion"
    text_completion(answer.model_dump(mode="json", exclude_unset=True))
    several = client.completions.create(model="echo", prompt=["a", "b"], echo=True)
    assert [c.text for c in several.choices] == ["aecho: a", "becho: b"]
    parts = list(
        client.completions.create(
            model="echo", prompt="say hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == "echo: say hi"
    assert parts[-2].choices[0].finish_reason == "stop" and parts[-1].usage is not None
    for part in parts:
        text_completion(part.model_dump(mode="json", exclude_unset=True))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="status-429", prompt="x")


# ---- Ollama's /api/generate --------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


def test_official_ollama_client_generates_with_the_emulator(
    emulator: tuple[FakeOllama, str],
) -> None:
    with ollama.Client(host=emulator[1]) as client:
        answer = client.generate(model="echo", prompt="hello there", raw=True)
        assert answer.response == "echo: hello there" and answer.done
        assert answer.eval_count == 3 and answer.prompt_eval_count == 2
        parts = list(
            client.generate(model="long", prompt="x", stream=True, options={"num_predict": 4})
        )
        assert "".join(p.response or "" for p in parts) == "w0 w1 w2 w3"
        assert parts[-1].done and parts[-1].done_reason == "length"
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="status-503", prompt="x")
        assert err.value.status_code == 503


def _entry(model: str) -> Entry:
    return Entry("ollama", model, timeout=10, connect_timeout=2, first_token_timeout=10)


def _ops(url: str, client: upstream.Client) -> OllamaOps:
    return OllamaOps(url, {"num_ctx": 2048}, "5m", lambda: client)


def _client() -> upstream.Client:  # as the Ollama adapter makes it: its headers on every call
    return upstream.Client({"Content-Type": "application/json", "Authorization": "Bearer k"})


async def test_ollama_raw_completion(emulator: tuple[FakeOllama, str]) -> None:
    fake, url = emulator
    request = _request(prompt="The sky is", max_tokens=20, temperature=0, stop=["\n"], seed=3)
    client = _client()
    done = await _ops(url, client).generate(translatable(request, "o", False), _entry("echo"))
    await client.close()
    body = text_completion(json.loads(done.body))
    assert body["choices"][0]["text"] == "echo: The sky is" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert fake.generated[-1] == {
        "model": "echo", "prompt": "The sky is", "raw": True, "stream": False,
        "options": {"num_ctx": 2048, "temperature": 0, "seed": 3, "num_predict": 20,
                    "stop": ["\n"]},
        "keep_alive": "5m",
    }  # fmt: skip
    assert fake.requests[-1].headers["authorization"] == "Bearer k"


async def test_ollama_raw_completion_streamed(emulator: tuple[FakeOllama, str]) -> None:
    _, url = emulator
    request = _request(prompt="go", echo=True, stream=True, max_tokens=4)
    client = _client()
    ops = _ops(url, client)
    raw = translatable(request, "o", False)
    chunks = [json.loads(c) async for c in ops.generate_stream(raw, _entry("long"), True)]
    await client.close()
    for chunk in chunks:
        text_completion(chunk)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts[0] == "go"  # echo: the prompt first
    assert "".join(texts[1:]) == "w0 w1 w2 w3"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks}) == 1


async def test_ollama_raw_completion_failures(emulator: tuple[FakeOllama, str]) -> None:
    _, url = emulator
    raw = translatable(_request(prompt="x"), "o", False)
    client = _client()
    ops = _ops(url, client)
    for model, reason in [("not-pulled", "model_missing"), ("status-400", "client_error"),
                          ("status-503", "server_error"), ("bad-json", "bad_response"),
                          ("error-first", "server_error")]:  # fmt: skip
        with pytest.raises(UpstreamError) as err:
            _ = [c async for c in ops.generate_stream(raw, _entry(model), False)]
        assert err.value.reason == reason, model
    got: list[bytes] = []
    with pytest.raises(UpstreamError) as err:
        async for chunk in ops.generate_stream(raw, _entry("truncated"), False):
            got.append(chunk)
    assert err.value.reason == "bad_response" and len(got) == 2
    with pytest.raises(UpstreamError) as err:
        await ops.generate(raw, _entry("status-500"))
    assert err.value.reason == "server_error"
    await client.close()


# ---- through the gateway ----------------------------------------------------------------------


def _gateway_config(fake_url: str, ollama_url: str, tiny: str) -> str:
    dead = f"http://127.0.0.1:{refused_port()}"
    return f"""
providers:
  up: {{type: openai, base_url: "{fake_url}/up/v1"}}
  dead: {{type: openai, base_url: "{dead}/v1", breaker: {{failures: 1000000}}}}
  ollama: {{type: ollama, base_url: "{ollama_url}"}}
  local: {{type: huggingface, device: cpu}}
models:
  local-first:
    - {{provider: local, model: "{tiny}"}}
    - {{provider: up, model: echo}}
  relay:
    - {{provider: dead, model: echo}}
    - {{provider: up, model: echo}}
  ollama-first:
    - {{provider: ollama, model: echo}}
    - {{provider: up, model: echo}}
  ollama-only:
    - {{provider: ollama, model: echo}}
  ollama-long:
    - {{provider: ollama, model: long}}
  cut-mid:
    - {{provider: up, model: error-mid}}
"""


@pytest.fixture(scope="module")
def gw(start_gateway: Any, fake_url: str, emulator: tuple[FakeOllama, str], tiny_dir: Path) -> Any:
    return start_gateway(_gateway_config(fake_url, emulator[1], str(tiny_dir)))


@pytest.fixture
def client(gw: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0) as c:
        yield c


def test_relayed_after_a_dead_entry(client: openai.OpenAI, gw: Any, fake: FakeOpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="relay", prompt="say hi", max_tokens=5, suffix="!", logprobs=2
    )
    answer = raw.parse()
    assert answer.choices[0].text == "echo: say hi"
    assert raw.headers["x-omnimind-provider"] == "up"
    assert raw.headers["x-omnimind-fallbacks"] == "dead:connect_error"
    assert fake.calls("up")[-1].body == {"model": "echo", "prompt": "say hi", "max_tokens": 5,
                                         "suffix": "!", "logprobs": 2}  # fmt: skip
    body = httpx.post(f"{gw.url}/v1/completions", json={"model": "relay", "prompt": "x"})
    text_completion(body.json())


def test_relayed_stream(client: openai.OpenAI, gw: Any) -> None:
    parts = list(
        client.completions.create(
            model="relay", prompt="say hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == "echo: say hi"
    assert parts[-1].usage is not None and parts[-1].usage.total_tokens > 0
    resp = httpx.post(
        f"{gw.url}/v1/completions", json={"model": "relay", "prompt": "x", "stream": True}
    )
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        text_completion(json.loads(event))


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_serves_raw_prompts(client: openai.OpenAI, stream: bool) -> None:
    raw = client.completions.with_raw_response.create(
        model="ollama-only", prompt="Once upon", echo=True, stream=stream
    )
    assert raw.headers["x-omnimind-provider"] == "ollama"
    answer = raw.parse()
    if stream:
        text = "".join(p.choices[0].text for p in answer if p.choices)  # type: ignore[union-attr]
    else:
        text = answer.choices[0].text  # type: ignore[union-attr]
    assert text == "Once uponecho: Once upon"


def test_what_ollama_cannot_honour_falls_to_the_next_entry(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="ollama-first", prompt="x", suffix="end"
    )
    assert raw.headers["x-omnimind-provider"] == "up"
    assert raw.headers["x-omnimind-fallbacks"] == "ollama:unsupported"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="ollama-only", prompt="x", suffix="end")
    assert "suffix" in err.value.message


def test_length_and_usage_from_ollama(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="ollama-long", prompt="a b", max_tokens=3)
    assert answer.choices[0].text == "w0 w1 w2" and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_the_local_model_serves_raw_prompts(client: openai.OpenAI, stream: bool) -> None:
    """No chat template: the prompt as it is, echoed first when asked, usage counted."""
    raw = client.completions.with_raw_response.create(
        model="local-first", prompt="Once upon", max_tokens=4, stream=stream, echo=True,
        stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
    )  # fmt: skip
    assert raw.headers["x-omnimind-provider"] == "local"
    answer = raw.parse()
    if stream:
        chunks = list(answer)  # type: ignore[arg-type]
        for chunk in chunks:
            text_completion(chunk.model_dump(exclude_unset=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = next(
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        )
        usage = chunks[-1].usage
    else:
        text_completion(answer.model_dump(exclude_unset=True))  # type: ignore[union-attr]
        text, finish = answer.choices[0].text, answer.choices[0].finish_reason  # type: ignore[union-attr]
        usage = answer.usage  # type: ignore[union-attr]
    assert text.startswith("Once upon") and len(text) > len("Once upon")  # echo, then tokens
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 4 and usage.prompt_tokens == 2


def test_the_local_model_takes_token_ids_and_passes_on_what_it_cannot_honour(
    client: openai.OpenAI,
) -> None:
    ids = client.completions.create(model="local-first", prompt=[12092, 905], max_tokens=3)
    assert ids.usage is not None and (ids.usage.prompt_tokens, ids.usage.completion_tokens) == (
        2,
        3,
    )
    for asked in [{"prompt": "x", "suffix": "!"}, {"prompt": ""}, {"prompt": [10**6]}]:
        raw = client.completions.with_raw_response.create(
            model="local-first", max_tokens=3, **asked
        )
        assert raw.headers["x-omnimind-provider"] == "up", asked
        assert raw.headers["x-omnimind-fallbacks"] == "local:unsupported", asked


def test_bad_requests_are_400s_through_the_gateway(gw: Any) -> None:
    for body, param in [({}, "prompt"), ({"prompt": []}, "prompt"),
                        ({"prompt": "x", "temperature": 9}, "temperature"),
                        ({"prompt": "x", "best_of": 2, "stream": True}, "best_of")]:  # fmt: skip
        resp = httpx.post(f"{gw.url}/v1/completions", json={"model": "relay", **body})
        assert resp.status_code == 400, body
        schemas.error(resp.json())
        assert resp.json()["error"]["param"] == param


def test_failure_mid_stream_ends_with_an_error_event(gw: Any) -> None:
    resp = httpx.post(
        f"{gw.url}/v1/completions", json={"model": "cut-mid", "prompt": "x", "stream": True}
    )
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert "error" in json.loads(events[-1]) and "[DONE]" not in events


def test_langchain_openai_llm(gw: Any) -> None:
    from langchain_openai import OpenAI

    with httpx.Client() as http:
        llm = OpenAI(
            base_url=f"{gw.url}/v1", api_key="k", model="ollama-first",  # type: ignore[arg-type]
            max_retries=0, http_client=http,
        )  # fmt: skip
        assert llm.invoke("Once upon") == "echo: Once upon"
        assert "".join(llm.stream("Once upon")) == "echo: Once upon"
