"""A request's turn with the state: admission, cache hit/miss, settling (in-process store)."""

from __future__ import annotations

import json

import httpx
import pytest

from proxy.auth import Guard
from proxy.config import CacheSpec, build, parse
from proxy.errors import RateLimited
from proxy.state import MemoryStore
from proxy.state.flow import begin
from proxy.wire import ChatRequest, Usage

from .conftest import GatewayFactory
from .test_state_mirror import FakeProvider

CONFIG = """
server:
  api_keys: [{id: team, key: k1, rate_limit_rpm: 3, rate_limit_tpm: 1000}]
providers: {up: {type: openai, base_url: "http://127.0.0.1:9"}}
models: {m: [{provider: up, model: gpt}]}
"""
CACHE = CacheSpec(ttl=60, max_entries=10)
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
ANSWER = json.dumps({
    "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()  # fmt: skip


async def _turn(guard: Guard, cache_control: str | None = None):  # type: ignore[no-untyped-def]
    caller = guard.identify({"authorization": "Bearer k1"}, "1.2.3.4")
    request = ChatRequest(BODY)
    breakers = {"up": FakeProvider()}
    return await begin(guard, caller, "m", [("up", "gpt")], breakers, CACHE, request.fields,
                       "chat", cache_control)  # fmt: skip


async def _settled(guard: Guard) -> None:
    await guard.store.flush()


async def test_a_miss_fills_the_cache_and_the_next_is_a_hit() -> None:
    store = MemoryStore()
    guard = Guard(build(parse(CONFIG)), store)
    miss = await _turn(guard)
    assert miss.cached is None
    headers = miss.headers()
    assert headers["x-omnimind-cache"] == "miss"
    assert headers["x-ratelimit-remaining-requests"] == "2"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    miss.done(Usage(1, 1, 2), 0.001, ANSWER)
    await _settled(guard)
    hit = await _turn(guard)
    assert hit.cached == ANSWER and hit.headers()["x-omnimind-cache"] == "hit"
    chunks = [json.loads(c) for c in hit.replay(include_usage=True)]
    assert chunks[0]["choices"][0]["delta"]["content"] == "hello"
    hit.hit()
    await _settled(guard)
    team = (await store.stats()).keys["team"]
    assert (team.requests, team.cached, team.prompt_tokens) == (2, 1, 1)
    with pytest.raises(RateLimited) as refused:
        await _turn(guard)
        await _turn(guard)
    assert refused.value.headers["retry-after"] == "20"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"


async def test_no_cache_refreshes_and_no_store_keeps_nothing() -> None:
    guard = Guard(build(parse(CONFIG)), MemoryStore())
    kept = await _turn(guard, "no-store")
    assert kept.headers()["x-omnimind-cache"] == "miss"
    kept.done(None, None, ANSWER)
    await _settled(guard)
    fresh = await _turn(guard, "no-cache")
    assert fresh.cached is None  # nothing was stored, and no-cache would not look anyway
    assembler = fresh.assembler()
    assert assembler is not None
    for payload in await _turn_replay(ANSWER):
        assembler.feed(payload)
    fresh.done(Usage(1, 1, 2), None, assembler)
    await _settled(guard)
    assert (await _turn(guard)).cached is not None  # no-cache's fresh answer was stored


async def _turn_replay(body: bytes) -> list[bytes]:
    from proxy.cache import replay

    return replay(body, include_usage=True)


async def test_a_request_admitted_already_is_not_counted_twice() -> None:
    store = MemoryStore()
    guard = Guard(build(parse(CONFIG)), store)
    caller = guard.identify({"authorization": "Bearer k1"}, "1.2.3.4")
    request = ChatRequest(BODY)
    for _ in range(3):  # the pipeline admitted these (rpm 3): the route only settles them
        await guard.admit(caller)
        turn = await begin(guard, caller, "m", [("up", "gpt")], {}, None, request.fields,
                           "chat", None, limits=False)  # fmt: skip
        turn.done(Usage(300, 0, 300), None)
    with pytest.raises(RateLimited, match="3 requests per minute") as refused:
        await guard.admit(caller)  # counted once each: the fourth is the one refused
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "100"  # tokens charged
    stats = await store.stats()
    assert stats.keys["team"].prompt_tokens == 900


async def test_unknown_aliases_are_not_kept_in_the_usage() -> None:
    store = MemoryStore()
    guard = Guard(build(parse(CONFIG)), store)
    caller = guard.identify({"authorization": "Bearer k1"}, "1.2.3.4")
    for _ in range(3):  # as routes_chat.serve does for a model it does not serve
        turn = await begin(guard, caller, "", [], {}, None, {}, "chat", None)
        turn.failed()
    stats = await store.stats()
    assert stats.aliases == {} and stats.keys["team"].requests == 3


def test_every_chain_route_charges_the_token_limit(
    start_gateway: GatewayFactory, fake_url: str
) -> None:
    gw = start_gateway(f"""
server:
  api_keys: [{{id: team, key: k1, rate_limit_tpm: 20}}]
providers: {{up: {{type: openai, base_url: "{fake_url}/up/v1"}}}}
models: {{echo: [{{provider: up, model: echo}}]}}
""")
    # 3 prompt + 4 completion tokens ("echo: one two three") a request: 20 admit three.
    asks = [
        ("/v1/messages", {"model": "echo", "max_tokens": 50,
                          "messages": [{"role": "user", "content": "one two three"}]}),
        ("/v1/responses", {"model": "echo", "input": "one two three"}),
        ("/v1/chat/completions", {"model": "echo",
                                  "messages": [{"role": "user", "content": "one two three"}]}),
    ]  # fmt: skip
    headers = {"authorization": "Bearer k1"}
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        codes = [http.post(path, json=body, headers=headers).status_code for path, body in asks]
        refused = http.post(asks[0][0], json=asks[0][1], headers=headers)
    assert codes == [200, 200, 200]
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-tokens"] == "0"
