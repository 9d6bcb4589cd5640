"""Pure logic, no sockets and no sleeps: breakers on a fake clock, the reason table, the
status table, Retry-After, the concurrency gate, the SSE parser, usage clamping,
context windows from the config."""

from __future__ import annotations

import asyncio
import email.utils
import re
from collections.abc import AsyncIterator

import pytest

import proxy.reasons
from proxy.accounting import MAX_TOKENS, clamp
from proxy.config import BreakerSpec, Entry, build, parse
from proxy.errors import EXCERPT, AllProvidersFailed, Attempt, UpstreamError, excerpt
from proxy.health import Health, ProviderHealth, Ticket
from proxy.limits import Gate
from proxy.policy import MAX_RETRY_AFTER, retry_after, status_reason
from proxy.providers.http import read_timeout
from proxy.providers.sse import MAX_EVENT, iter_sse
from proxy.reasons import Reason, Scope
from proxy.timer import within
from proxy.tokens import estimate_prompt
from proxy.wire import ChatRequest, Usage

from .helpers import dump


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _error(reason: Reason, retry: float | None = None, status: int | None = None) -> UpstreamError:
    return UpstreamError(reason, f"{reason} happened", status, retry)


SPEC = BreakerSpec(failures=3, cooldown=10, max_cooldown=35, rate_limit_cooldown=2)


# ---- one breaker ------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    health = Health(SPEC, clock)
    for _ in range(2):
        assert health.admit() is None
        health.failure(_error(Reason.SERVER_ERROR))
    assert health.state == "closed" and health.failures == 2
    health.success(12.0)  # a success in between resets the count
    assert health.failures == 0
    for _ in range(3):
        assert health.admit() is None
        health.failure(_error(Reason.SERVER_ERROR))
    assert health.state == "open" and health.ejections == 1 and health.epoch == 1
    assert health.admit() == (Reason.CIRCUIT_OPEN, 10.0)
    clock.advance(10)
    assert health.state == "half_open"
    assert health.admit() is None  # the one probe
    verdict = health.admit()  # everyone else waits for the probe's verdict
    assert verdict is not None and verdict[0] is Reason.CIRCUIT_OPEN
    health.success(5.0)
    assert health.state == "closed" and health.ejections == 0 and not health.probing


def test_failed_probe_reopens_for_twice_as_long_capped() -> None:
    clock = Clock()
    health = Health(SPEC, clock)
    for _ in range(3):
        health.failure(_error(Reason.TIMEOUT))
    opened = []
    for _ in range(4):
        clock.now = health.open_until
        assert health.admit() is None
        health.failure(_error(Reason.TIMEOUT))  # one failed probe is enough
        opened.append(health.open_until - clock.now)
    assert opened == [20.0, 35.0, 35.0, 35.0]  # 10 * 2**n, capped at max_cooldown
    assert health.snapshot().circuit_open_remaining_s == 35.0


def test_abandoned_probe_frees_the_probe_slot() -> None:
    clock = Clock()
    health = Health(SPEC, clock)
    for _ in range(3):
        health.failure(_error(Reason.BAD_RESPONSE))
    clock.advance(10)
    assert health.admit() is None
    health.abandon()  # the client left: no verdict
    assert health.admit() is None  # another request may probe


def test_failures_admitted_before_an_ejection_count_once() -> None:
    health = Health(SPEC, Clock())
    epochs = [health.epoch for _ in range(20)]  # twenty admitted together
    for epoch in epochs:
        health.failure(_error(Reason.TIMEOUT), epoch)
    assert health.ejections == 1 and health.errors == 20


def test_soft_reasons_never_eject() -> None:
    health = Health(SPEC, Clock())
    for reason in Reason:
        if reason.scope is Scope.NONE:
            health.failure(_error(reason))
    assert health.state == "closed" and health.failures == 0
    assert health.last_error is not None


def test_rate_limits_cool_for_what_was_asked_capped() -> None:
    clock = Clock()
    health = Health(SPEC, clock)
    health.failure(_error(Reason.RATE_LIMITED, retry=7))
    assert health.admit() == (Reason.COOLING_DOWN, 7.0)
    clock.advance(7)
    assert health.admit() is None
    health.failure(_error(Reason.RATE_LIMITED))  # no Retry-After: rate_limit_cooldown
    assert health.admit() == (Reason.COOLING_DOWN, 2.0)
    clock.advance(2)
    health.failure(_error(Reason.RATE_LIMITED, retry=3600))
    assert health.snapshot().cooldown_remaining_s == 35.0  # max_cooldown
    clock.advance(35)
    health.failure(_error(Reason.SERVER_ERROR, retry=4, status=503))  # 503 + Retry-After
    assert health.admit() == (Reason.COOLING_DOWN, 4.0)
    assert health.failures == 0  # a cool-down, not a hard failure
    health.cool(9)  # seen elsewhere (another instance)
    assert health.admit() == (Reason.COOLING_DOWN, 9.0)


def test_latency_windows() -> None:
    health = Health(SPEC, Clock())
    assert health.snapshot().latency_ms.p50 is None
    for ms in range(1, 101):
        health.success(float(ms), ttft_ms=float(ms) / 10)
    snap = health.snapshot()
    assert (snap.latency_ms.p50, snap.latency_ms.p95) == (51.0, 96.0)
    assert snap.ttft_ms.p50 == 5.1 and snap.requests == snap.successes == 100


# ---- a provider: host and deployments ----------------------------------------------------


def test_host_faults_eject_the_provider_for_every_model() -> None:
    clock = Clock()
    provider = ProviderHealth(SPEC, clock)
    for model in ("a", "b", "c"):  # three models, one host refusing
        ticket = provider.admit(model)
        assert isinstance(ticket, Ticket)
        provider.failure(model, _error(Reason.CONNECT_ERROR), ticket)
    assert provider.host.state == "open" and provider.reachable is False
    assert provider.admit("d") == (Reason.CIRCUIT_OPEN, 10.0)  # never tried, skipped too
    assert all(d.failures == 0 for d in provider.deployments.values())
    assert not provider.available()


def test_model_faults_eject_only_that_deployment() -> None:
    provider = ProviderHealth(SPEC, Clock())
    for reason in (Reason.SERVER_ERROR, Reason.MODEL_MISSING, Reason.TIMEOUT):
        ticket = provider.admit("broken")
        assert isinstance(ticket, Ticket)
        provider.failure("broken", _error(reason), ticket)
    assert provider.deployment("broken").state == "open"
    assert isinstance(provider.admit("fine"), Ticket)
    assert provider.host.state == "closed" and provider.host.failures == 0
    assert provider.available()
    assert provider.host.last_error is not None  # shown at the provider level too


def test_a_stream_is_judged_at_its_end() -> None:
    provider = ProviderHealth(SPEC, Clock())
    for _ in range(3):  # first chunk, then a failure mid-way
        assert isinstance(provider.admit("m"), Ticket)
        provider.started("m", 40.0)
        provider.failure("m", _error(Reason.STREAM_ERROR))
    assert provider.deployment("m").state == "open"
    assert provider.reachable is True
    assert list(provider.deployment("m").ttfts) == [40.0] * 3


def test_reachable_as_last_seen() -> None:
    provider = ProviderHealth(SPEC, Clock())
    assert provider.reachable is None and provider.available()
    provider.failure("m", _error(Reason.CONNECT_TIMEOUT))
    assert provider.reachable is False and not provider.available()
    provider.success("m", 3.0)
    assert provider.reachable is True and provider.available()
    provider.failure("m", _error(Reason.CONNECT_ERROR))
    provider.failure("m", _error(Reason.SERVER_ERROR, status=500))  # it answers again
    assert provider.reachable is True


# ---- the reason vocabulary ---------------------------------------------------------------

_SCOPES = {
    "the provider": Scope.PROVIDER,
    "the deployment": Scope.DEPLOYMENT,
    "cools the deployment": Scope.NONE,
    "nothing": Scope.NONE,
}


def _documented() -> dict[str, tuple[bool, Scope, bool]]:
    """reasons.py's table: reason -> (falls back, scope, retried on the same provider)."""
    table = {}
    row = re.compile(r"^ {4}(\w+) +(yes|no) +(.+?) +(yes|no)( +\(.*\))?$", re.M)
    for name, falls, counts, retried, _ in row.findall(proxy.reasons.__doc__ or ""):
        table[name] = (falls == "yes", _SCOPES[counts.strip()], retried == "yes")
    return table


def test_every_reason_is_documented_with_its_policy() -> None:
    documented = _documented()
    assert set(documented) == {r.value for r in Reason}
    for reason in Reason:
        assert (reason.falls_back, reason.scope, reason.retry_same) == documented[reason], reason
        assert reason.hard == (reason.scope is not Scope.NONE)
        assert Reason.of(reason.value) is reason


def test_only_client_errors_stop_the_chain() -> None:
    assert [r for r in Reason if not r.falls_back] == [Reason.CLIENT_ERROR]


# ---- upstream statuses -------------------------------------------------------------------

CONTEXT_WORDINGS = [
    # OpenAI, vLLM
    "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "9000 tokens. Please reduce the length of the messages.",
    "prompt is too long: 250000 tokens > 200000 maximum",  # Anthropic
    "the request exceeds the available context size, try increasing it",  # llama.cpp
    "Input is too long for requested model.",  # Bedrock
    "Trying to keep the first 9000 tokens when context the overflows. n_ctx: 4096",
    "Requested too many tokens for this model",
]


@pytest.mark.parametrize(
    ("status", "message", "code", "reason"),
    [
        (400, "bad field", None, Reason.CLIENT_ERROR),
        (413, "too large", None, Reason.CLIENT_ERROR),
        (422, "unprocessable", None, Reason.CLIENT_ERROR),
        (400, "whatever", "context_length_exceeded", Reason.CONTEXT_TOO_LONG),
        (400, "whatever", "string_above_max_length", Reason.CONTEXT_TOO_LONG),
        (413, CONTEXT_WORDINGS[0], None, Reason.CLIENT_ERROR),  # only a 400 says so
        (301, "", None, Reason.REDIRECT),
        (302, "", None, Reason.REDIRECT),
        (307, "", None, Reason.REDIRECT),
        (401, "", None, Reason.UPSTREAM_AUTH),
        (402, "out of credits", None, Reason.PAYMENT_REQUIRED),
        (403, "", None, Reason.UPSTREAM_AUTH),
        (404, "", None, Reason.MODEL_MISSING),
        (405, "", None, Reason.NOT_SERVED),
        (408, "", None, Reason.SERVER_ERROR),
        (409, "", None, Reason.SERVER_ERROR),
        (410, "", None, Reason.NOT_SERVED),
        (418, "", None, Reason.NOT_SERVED),
        (429, "", None, Reason.RATE_LIMITED),
        (500, "", None, Reason.SERVER_ERROR),
        (503, "", None, Reason.SERVER_ERROR),
        (599, "", None, Reason.SERVER_ERROR),
        (204, "", None, Reason.BAD_RESPONSE),
    ],
)
def test_status_table(status: int, message: str, code: str | None, reason: Reason) -> None:
    assert status_reason(status, message, code) is reason


@pytest.mark.parametrize("message", CONTEXT_WORDINGS)
def test_context_wordings_in_a_400(message: str) -> None:
    assert status_reason(400, message) is Reason.CONTEXT_TOO_LONG


# ---- Retry-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        ({"retry-after": "86400"}, MAX_RETRY_AFTER),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
        ({"retry-after-ms": "x", "retry-after": "9"}, 9.0),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(headers) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after({"retry-after": date}, now=now) == 30.0
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert retry_after({"retry-after": past}, now=now) == 0.0


# ---- the concurrency gate ---------------------------------------------------------------


async def test_gate_queues_then_refuses() -> None:
    gate = Gate(limit=2, max_queue=1)
    await gate.acquire()
    await gate.acquire()
    assert gate.in_use == 2 and gate.waiting == 0
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    assert gate.waiting == 1
    with pytest.raises(UpstreamError) as err:
        await gate.acquire()
    assert err.value.reason is Reason.QUEUE_FULL
    gate.release()
    await waiter
    assert gate.in_use == 2 and gate.waiting == 0
    gate.release()
    gate.release()
    assert gate.in_use == 0


async def test_gate_wait_can_be_cancelled_without_leaking() -> None:
    gate = Gate(limit=1, max_queue=5)
    await gate.acquire()
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.release()
    assert gate.in_use == 0
    await gate.acquire()  # the slot is still there


async def test_unlimited_gate() -> None:
    gate = Gate(limit=None, max_queue=0)
    for _ in range(100):
        await gate.acquire()
    assert gate.in_use == 0 and gate.waiting == 0
    gate.release()


# ---- the SSE parser ---------------------------------------------------------------------


class _Reads:
    """Stands in for an upstream response: `iter_any()` yields the reads as given."""

    def __init__(self, *reads: bytes) -> None:
        self.reads = reads

    async def iter_any(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read


async def _events(*reads: bytes) -> list[bytes]:
    return [data async for data in iter_sse(_Reads(*reads))]  # type: ignore[arg-type]


async def test_sse_usual_events() -> None:
    assert await _events(b"data: {}\n\ndata: [DONE]\n\n") == [b"{}", b"[DONE]"]


@pytest.mark.parametrize(
    "reads",
    [
        (b"data: a\r\n\r\ndata: b\r\n\r\n",),
        (b"data: a\r", b"\n\r\ndata: b\r\n\r\n"),  # a CRLF split across reads
        (b"data: a\r\r", b"data: b\r\r"),  # lone CRs
        (b"da", b"ta: a\n", b"\ndata: b\n\n"),  # a line split across reads
        (b"data:a\n\ndata:b\n\n",),  # no space after the colon
        (b": comment\n\nevent: x\nid: 1\ndata: a\n\nretry: 5\n\ndata: b\n\n",),
    ],
)
async def test_sse_framings_give_the_same_events(reads: tuple[bytes, ...]) -> None:
    assert await _events(*reads) == [b"a", b"b"]


async def test_sse_multi_line_data_is_joined_with_lf() -> None:
    assert await _events(b'data: {"a":\ndata:  1}\n\n') == [b'{"a":\n 1}']


async def test_sse_data_pending_at_the_end_is_yielded() -> None:
    assert await _events(b"data: a\n\ndata: [DONE]") == [b"a", b"[DONE]"]
    assert await _events(b"data: a\n\ndata: [DONE]\r") == [b"a", b"[DONE]"]


async def test_sse_events_without_data_yield_nothing() -> None:
    assert await _events(b": keep-alive\n\nevent: ping\n\n") == []
    assert await _events(b"") == []


async def test_sse_event_without_end_is_bounded() -> None:
    block = b"data: " + b"x" * (1024 * 1024)
    with pytest.raises(UpstreamError) as err:
        await _events(*([block] * (MAX_EVENT // len(block) + 2)))
    assert err.value.reason is Reason.BAD_RESPONSE


# ---- usage, excerpts, context windows -------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        (Usage(3, 4, 99), Usage(3, 4, 7)),  # the total is the sum, whatever was said
        (Usage(-5, 2, 0), Usage(0, 2, 2)),
        (Usage(10**12, 1, 0), Usage(MAX_TOKENS, 1, MAX_TOKENS + 1)),
        (Usage("7", 1.5, 0), Usage(0, 0, 0)),  # type: ignore[arg-type]
    ],
)
def test_clamp(usage: Usage | None, expected: Usage | None) -> None:
    assert clamp(usage) == expected


def test_excerpt() -> None:
    assert excerpt("  a\n\n b\tc ") == "a b c"
    long = excerpt("word " * 100)
    assert len(long) == EXCERPT and long.endswith("...")


def test_all_failed_with_context_names_the_largest_window() -> None:
    attempts = [
        Attempt("a", "m", Reason.CONTEXT_TOO_LONG, message="window is 50"),
        Attempt("b", "m", Reason.CONTEXT_TOO_LONG, message="window is 120"),
    ]
    error = AllProvidersFailed("alias", attempts, None, largest_window=120)
    assert error.status == 400 and error.code == "context_length_exceeded"
    assert "largest context window in its chain is 120 tokens" in error.message
    mixed = AllProvidersFailed("alias", [*attempts, Attempt("c", "m", Reason.TIMEOUT)], None)
    assert mixed.status == 504  # not every entry was too small: no 400


def test_token_estimate_errs_long() -> None:
    request = ChatRequest.from_obj(
        {"model": "m", "messages": [{"role": "user", "content": "x" * 30}]}
    )
    assert estimate_prompt(request) >= 10  # 3 bytes a token: no fewer than 30 / 4
    assert request.max_tokens() is None
    budget = ChatRequest.from_obj({"model": "m", "messages": [], "max_completion_tokens": 9})
    assert budget.max_tokens() == 9


def test_context_window_from_the_provider_unless_the_entry_says() -> None:
    config = {
        "providers": {
            "ollama": {
                "type": "ollama",
                "base_url": "http://127.0.0.1:9",
                "options": {"num_ctx": 4096},
            },
            "plain": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"},
        },
        "models": {
            "m": [
                {"provider": "ollama", "model": "a"},
                {"provider": "ollama", "model": "b", "context_window": 2048},
                {"provider": "plain", "model": "c"},
            ]
        },
    }
    entries = build(parse(dump(config))).models["m"]
    assert [e.context_window for e in entries] == [4096, 2048, None]


def test_socket_timeouts_never_cut_a_first_chunk_short() -> None:
    cold = Entry("p", "m", timeout=1, connect_timeout=2, first_token_timeout=30)
    assert read_timeout(cold, stream=True) == 30  # a cold model may take long at first
    assert read_timeout(cold, stream=False) is None  # the chain bounds a whole answer
    warm = Entry("p", "m", timeout=60, connect_timeout=2, first_token_timeout=5)
    assert read_timeout(warm, stream=True) == 60


# ---- timer.within: asyncio.timeout's meaning on the hot path --------------------------------


async def test_within_times_out_and_lets_the_work_finish() -> None:
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        with within(0):  # fires on the loop's next turn: no wall-clock race
            await never
    with within(60):
        await asyncio.sleep(0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_within_leaves_someone_elses_cancel_alone() -> None:
    started = asyncio.Event()

    async def work(seconds: float) -> None:
        with within(seconds):
            started.set()
            await asyncio.get_running_loop().create_future()

    task = asyncio.ensure_future(work(60))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The timer and an outside cancel in the same turn: the outside one wins, as with
    # asyncio.timeout (the cancel count says someone else asked too).
    started.clear()
    task = asyncio.ensure_future(work(0))
    await started.wait()
    asyncio.get_running_loop().call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_gate_try_acquire_takes_only_a_free_slot_no_one_waits_for() -> None:
    gate = Gate(1, max_queue=4)
    assert gate.try_acquire() and gate.in_use == 1
    assert not gate.try_acquire()
    waiter = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # the slot goes to the one waiting, not to a later try
    assert not gate.try_acquire()
    await waiter
    gate.release()
    assert gate.in_use == 0 and gate.try_acquire()
    assert Gate(None, max_queue=0).try_acquire()  # no limit: always
