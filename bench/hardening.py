"""What the hardening costs on the hot path, measured side by side in one run.

    python -m bench.hardening            # all: micro costs, then req/s at c=32
    python -m bench.hardening micro
    python -m bench.hardening load [seconds] [rounds]

- micro: `BoundedHttpToolsProtocol` vs uvicorn's `HttpToolsProtocol` parsing the same
  keep-alive POST (a fake transport, the ASGI task run to its end); `edge.check_body` on
  a chat body; `Redactor.text` on an upstream error message; `edge.request_id`.
- load: two uvicorn servers (plain httptools, bounded) on one tiny ASGI app, each in its
  own process, driven in turns by one asyncio loader at 32 keep-alive connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.config import ServerSpec
from proxy.edge import check_body
from proxy.httpproto import Limits, bounded_protocol, uvicorn_options
from proxy.redact import Redactor

from .load import chat_body
from .procs import free_port

_BODY = chat_body("omnimind-fast", False)
_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n"
    b"user-agent: OpenAI/Python 1.55.0\r\naccept: application/json\r\n"
    b"content-type: application/json\r\nauthorization: Bearer sk-local\r\n"
    b"x-stainless-lang: python\r\nx-stainless-package-version: 1.55.0\r\n"
    b"x-stainless-os: Linux\r\nx-stainless-arch: x64\r\nx-stainless-runtime: CPython\r\n"
    b"accept-encoding: gzip, deflate\r\nconnection: keep-alive\r\n"
    b"content-length: %d\r\n\r\n%b" % (len(_BODY), _BODY)
)
_ANSWER = b'{"status":"ok"}'


async def tiny_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(_ANSWER))]})  # fmt: skip
    await send({"type": "http.response.body", "body": _ANSWER})


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass


async def _per_request(protocol_class: type[HttpToolsProtocol], n: int) -> float:
    config = uvicorn.Config(tiny_app, log_level="error", lifespan="off")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    started = time.perf_counter()
    for _ in range(n):
        protocol.data_received(_REQUEST)
        await asyncio.sleep(0)  # the ASGI task runs to its end
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    protocol.connection_lost(None)
    return elapsed / n * 1e6


def _best(fn: Callable[[], float], rounds: int = 5) -> float:
    return min(fn() for _ in range(rounds))


def micro(n: int = 20000) -> list[tuple[str, float, float]]:
    import uvloop

    bounded = bounded_protocol(Limits())
    rows: list[tuple[str, float, float]] = []
    loop = uvloop.new_event_loop()
    try:
        plain_us, bounded_us = [], []
        for _ in range(5):  # interleaved: the machine's noise hits both alike
            plain_us.append(loop.run_until_complete(_per_request(HttpToolsProtocol, n)))
            bounded_us.append(loop.run_until_complete(_per_request(bounded, n)))
        rows.append(("keep-alive POST through the protocol (us)", min(plain_us), min(bounded_us)))
    finally:
        loop.close()

    def timed(fn: Callable[[], object], count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            fn()
        return (time.perf_counter() - started) / count * 1e6

    deep_chat = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi [x] {y}"}] * 100}
    ).encode()
    redactor = Redactor([f"sk-or-v1-{i:060d}" for i in range(8)])
    message = "Upstream returned 400: model 'x' does not exist or you lack access to it. " * 3
    cases: list[tuple[str, Callable[[], object], int]] = [
        (f"edge.check_body, chat body {len(_BODY)} B", lambda: check_body(_BODY), n),
        (
            f"edge.check_body, 100 messages {len(deep_chat)} B: depth scan",
            lambda: check_body(deep_chat),
            n // 10,
        ),
        (
            f"(reference) msgspec.json.decode of those {len(deep_chat)} B",
            lambda: msgspec.json.decode(deep_chat),
            n // 10,
        ),
        (f"Redactor.text, 8 secrets, {len(message)} chars", lambda: redactor.text(message), n),
    ]
    for name, fn, count in cases:
        rows.append((f"{name} (us)", 0.0, min(timed(fn, count) for _ in range(5))))
    return rows


def _serve(port: int, kind: str) -> None:
    options: dict[str, Any] = {"http": "httptools"}
    if kind == "bounded":
        options = {**uvicorn_options(ServerSpec()), "http": bounded_protocol(Limits())}
    uvicorn.run(tiny_app, host="127.0.0.1", port=port, loop="uvloop", log_level="error",
                access_log=False, **options)  # fmt: skip


async def _drive(port: int, seconds: float, connections: int = 32) -> float:
    head = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
    done = 0
    stop = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = 0
        while time.perf_counter() < stop:
            writer.write(head)
            if not size:  # learn the response's size once
                data = await reader.readuntil(b"\r\n\r\n")
                length = int(data.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                size = len(data) + length
            else:
                await reader.readexactly(size)
            done += 1
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return done / seconds


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(seconds: float = 1.0, rounds: int = 11) -> dict[str, dict[str, float]]:
    """req/s (wall clock: noisy on a shared machine) and server CPU per request (robust)."""
    import uvloop

    procs, ports = {}, {}
    for kind in ("plain", "bounded"):
        ports[kind] = free_port()
        procs[kind] = subprocess.Popen(
            [sys.executable, "-m", "bench.hardening", "serve", str(ports[kind]), kind],
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
    try:
        time.sleep(2.0)
        rates: dict[str, list[float]] = {"plain": [], "bounded": []}
        cpu = {"plain": 0.0, "bounded": 0.0}
        for i in range(rounds):
            for kind in ("plain", "bounded") if i % 2 == 0 else ("bounded", "plain"):
                before = _cpu_seconds(procs[kind].pid)
                rates[kind].append(uvloop.run(_drive(ports[kind], seconds)))
                cpu[kind] += _cpu_seconds(procs[kind].pid) - before
        return {
            k: {
                "rps": statistics.median(v),
                "cpu_us": cpu[k] / (sum(v) * seconds) * 1e6,
            }
            for k, v in rates.items()
        }
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "all"
    if what == "serve":
        _serve(int(argv[1]), argv[2])
        return
    if what in ("all", "micro"):
        print("| case | plain | hardened |\n|---|---|---|")
        for name, plain, hardened in micro():
            print(f"| {name} | {plain:.2f} | {hardened:.2f} |" if plain else
                  f"| {name} | - | {hardened:.2f} |")  # fmt: skip
    if what in ("all", "load"):
        seconds = float(argv[1]) if len(argv) > 1 else 1.0
        rounds = int(argv[2]) if len(argv) > 2 else 11
        rates = load(seconds, rounds)
        base, hard = rates["plain"], rates["bounded"]
        print(f"c=32 keep-alive GETs, {rounds} x {seconds:g} s in turns: req/s plain "
              f"{base['rps']:.0f}, bounded {hard['rps']:.0f} (ratio "
              f"{hard['rps'] / base['rps']:.3f}); server CPU per request plain "
              f"{base['cpu_us']:.1f} us, bounded {hard['cpu_us']:.1f} us (ratio "
              f"{hard['cpu_us'] / base['cpu_us']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
