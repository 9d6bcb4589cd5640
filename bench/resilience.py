"""What faults cost, and a soak of mixed faults.

    python -m bench.resilience                  # added latency per fault, one table
    python -m bench.resilience --soak 120       # mixed faults at steady load for 120 s

Upstream: the test suite's fake OpenAI server (real SSE over a real socket; the model name
picks the fault). The gateway runs in its own process, single worker.

Latency: sequential requests (concurrency 1) to aliases whose first entry is healthy,
refused (breaker closed / open), or hanging (without / with hedging); each reported as
p50/p99 and as the time added over the healthy alias.

Soak: concurrent clients send a mix of healthy and faulty requests (5xx, 429, resets,
hangs, bad JSON, mid-stream errors and truncations, refused ports, clients that
disconnect mid-stream) for the given time. It checks that no request outlives the
request deadline, and samples the gateway's RSS, open file descriptors and TCP
connections at the start and the end; the upstream must see no request left open.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from tests.fake_openai import FakeOpenAI
from tests.servers import AiohttpServer, refused_port

from . import procs

REQUEST_TIMEOUT = 5.0


def _config(fake: str, hedge_ms: int = 50) -> str:
    def provider(name: str, extra: str = "") -> str:
        return (
            f"  {name}:\n    type: openai\n    base_url: {fake}/{name}/v1\n"
            f"    timeout: 1\n    first_token_timeout: 0.5\n{extra}"
        )

    never = "    breaker: {failures: 1000000, max_cooldown: 0.001}\n"
    return (
        f"server: {{request_timeout: {REQUEST_TIMEOUT}, audit_log: off}}\n"
        "providers:\n"
        + provider("up", never)
        + provider("slow", never)
        + provider("faulty", never)
        + f"  dead:\n    type: openai\n    base_url: http://127.0.0.1:{refused_port()}/v1\n"
        + "    breaker: {failures: 1000000}\n"
        + f"  ejected:\n    type: openai\n    base_url: http://127.0.0.1:{refused_port()}/v1\n"
        + "    breaker: {failures: 1, cooldown: 3600}\n"
        + "models:\n"
        + "  healthy: [{provider: up, model: echo}]\n"
        + "  refused-closed: [{provider: dead, model: x}, {provider: up, model: echo}]\n"
        + "  refused-open: [{provider: ejected, model: x}, {provider: up, model: echo}]\n"
        + "  hang: [{provider: slow, model: hang}, {provider: up, model: echo}]\n"
        + f"  hang-hedged:\n    hedge_after_ms: {hedge_ms}\n"
        + "    chain: [{provider: slow, model: hang}, {provider: up, model: echo}]\n"
        + "".join(
            f"  f-{fault}: [{{provider: faulty, model: {fault}}}, {{provider: up, model: echo}}]\n"
            for fault in SOAK_FAULTS
        )
    )


SOAK_FAULTS = ["echo", "status-500", "status-503", "status-429", "reset", "bad-json", "hang",
               "error-mid", "reset-mid", "no-done", "slow-first-800"]  # fmt: skip
LATENCY_ALIASES = ["healthy", "refused-closed", "refused-open", "hang", "hang-hedged"]
BODY = {"messages": [{"role": "user", "content": "hello"}]}


async def _one(session: aiohttp.ClientSession, url: str, model: str, stream: bool) -> float:
    started = time.perf_counter()
    async with session.post(url, json={**BODY, "model": model, "stream": stream}) as resp:
        await resp.read()
    return (time.perf_counter() - started) * 1000


async def latency(url: str, n: int) -> dict[str, tuple[float, float]]:
    out = {}
    async with aiohttp.ClientSession() as session:
        await _one(session, url, "refused-open", False)  # ejects `ejected` for the run
        for alias in LATENCY_ALIASES:
            for stream in (False, True):
                samples = [await _one(session, url, alias, stream) for _ in range(n)]
                samples.sort()
                key = f"{alias} ({'stream' if stream else 'non-stream'})"
                out[key] = (statistics.median(samples), samples[int(0.99 * (len(samples) - 1))])
    return out


def latency_table(results: dict[str, tuple[float, float]]) -> str:
    rows = ["| first entry | p50 ms | p99 ms | added p50 ms |", "|---|---|---|---|"]
    for key, (p50, p99) in results.items():
        mode = key.split(" (")[1]
        base = results[f"healthy ({mode}"][0]
        rows.append(f"| {key} | {p50:.2f} | {p99:.2f} | {p50 - base:+.2f} |")
    return "\n".join(rows)


async def soak(url: str, seconds: float, concurrency: int, gateway: procs.Server) -> str:
    proc = psutil.Process(gateway.worker_pid())
    deadline = time.monotonic() + seconds
    counts = {"ok": 0, "error_status": 0, "error_event": 0, "disconnected": 0, "hung": 0}
    slowest = 0.0
    samples: list[tuple[float, float, int, int]] = []

    def sample() -> None:
        samples.append((time.monotonic(), proc.memory_info().rss / 2**20, proc.num_fds(),
                        len(proc.net_connections(kind="tcp"))))  # fmt: skip

    async def client(session: aiohttp.ClientSession, rng: random.Random) -> None:
        nonlocal slowest
        while time.monotonic() < deadline:
            model = f"f-{rng.choice(SOAK_FAULTS)}" if rng.random() < 0.8 else "refused-closed"
            stream = rng.random() < 0.5
            leave_early = stream and rng.random() < 0.1
            started = time.monotonic()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT + 2):
                    async with session.post(
                        url, json={**BODY, "model": model, "stream": stream}
                    ) as r:
                        if leave_early:
                            await r.content.readline()
                            r.close()  # the client goes away mid-stream
                            counts["disconnected"] += 1
                            continue
                        text = await r.text()
                if r.status != 200:
                    counts["error_status"] += 1
                elif stream and '"error"' in text.rsplit("data: ", 1)[-1]:
                    counts["error_event"] += 1
                else:
                    counts["ok"] += 1
            except TimeoutError:
                counts["hung"] += 1
            slowest = max(slowest, time.monotonic() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sample()
        sampler_stop = asyncio.Event()

        async def sampler() -> None:
            while not sampler_stop.is_set():
                await asyncio.sleep(max(1.0, seconds / 20))
                sample()

        task = asyncio.create_task(sampler())
        await asyncio.gather(*(client(session, random.Random(i)) for i in range(concurrency)))
        sampler_stop.set()
        await task
    await asyncio.sleep(1.5)  # let cancelled upstream calls finish closing
    sample()
    first, warm, last = samples[0], samples[min(2, len(samples) - 1)], samples[-1]
    total = sum(counts.values())
    return "\n".join([
        f"soak: {seconds:.0f} s, {concurrency} clients, {total} requests "
        f"({total / seconds:.0f}/s): " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        f"slowest request: {slowest:.2f} s (deadline {REQUEST_TIMEOUT:.0f} s)",
        "| gateway | start | after warm-up | end |",
        "|---|---|---|---|",
        f"| RSS MB | {first[1]:.1f} | {warm[1]:.1f} | {last[1]:.1f} |",
        f"| open fds | {first[2]} | {warm[2]} | {last[2]} |",
        f"| TCP connections | {first[3]} | {warm[3]} | {last[3]} |",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="per alias and mode")
    parser.add_argument("--soak", type=float, default=0, help="soak seconds (0: skip)")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    fake = FakeOpenAI()
    upstream = AiohttpServer(fake.app())
    logdir = Path(tempfile.mkdtemp(prefix="omnimind-bench-"))
    config = logdir / "models.yaml"
    config.write_text(_config(upstream.url), encoding="utf-8")
    port = procs.free_port()
    gateway = procs.start(
        "gateway",
        [procs.PY, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
         "--log-level", "error"],
        port, logdir, health="/health",
    )  # fmt: skip
    try:
        results = asyncio.run(latency(gateway.url, args.requests))
        print(latency_table(results))
        if args.soak:
            print()
            print(asyncio.run(soak(gateway.url, args.soak, args.concurrency, gateway)))
            print(f"upstream requests still open: {fake.active}")
    finally:
        gateway.stop()
        upstream.close()


if __name__ == "__main__":
    main()
