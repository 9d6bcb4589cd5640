"""What the gateway costs over calling its upstream directly, and over a bare pass-through.

    python -m bench [--seconds 2] [--repeat 2] [--servers uvicorn,granian] [--quick] ...

Starts, each in its own process on 127.0.0.1: a static upstream (bench/upstream.py), the
floor (bench/floor.py), the gateway under uvicorn (`python -m proxy serve`), the same
with `--workers 2`, under granian (bench/asgi.py), and with --prototype a suggestion not
landed (bench/tuned.py). Drives each with wrk (installed with apt-get if missing, else
bench/pyload.py) at every concurrency, streamed and not; then holds many slow streams
open for memory, times dripping streams chunk by chunk, measures fallback past a refused
port, profiles the gateway with py-spy and times hot-path pieces (bench/micro.py). Prints
a markdown report and writes it to bench/results/<date>.md. About four minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import resource
import shutil
import tempfile
import time
from pathlib import Path

import uvloop

from . import micro, profile, streams
from .load import Load, chat_body, find_wrk
from .procs import PY, ROOT, Server, free_port, start
from .report import DIRECT, FLOOR, GatewayStats, Results, Row, markdown

_CONFIG = """\
server:                       # audit_log stays at its default (stdout: the server's log file)
  request_timeout: 300
providers:
  static:
    type: openai
    base_url: http://127.0.0.1:{up}/v1
    timeout: 120
  dead:                       # nothing listens here: every call is refused
    type: openai
    base_url: http://127.0.0.1:{refused}/v1
    connect_timeout: 1
    breaker: {{failures: 1000000000}}
  dead_breaker:
    type: openai
    base_url: http://127.0.0.1:{refused}/v1
    connect_timeout: 1
models:
  bench: [{{provider: static, model: bench}}]
  bench-fallback:
    - {{provider: dead, model: bench}}
    - {{provider: static, model: bench}}
  bench-fallback-breaker:
    - {{provider: dead_breaker, model: bench}}
    - {{provider: static, model: bench}}
  drip: [{{provider: static, model: {drip}}}]
  hold: [{{provider: static, model: drip-2-60000}}]
"""
_UVICORN_GATEWAY = [PY, "-m", "proxy", "serve", "--config", "{config}", "--port", "{port}",
                    "--log-level", "warning"]  # fmt: skip
_GRANIAN = [PY, "-m", "granian", "--interface", "asgi", "--factory", "--host", "127.0.0.1",
            "--port", "{port}", "--workers", "1", "--loop", "uvloop", "--http", "1", "--no-ws",
            "--backlog", "2048", "--log-level", "warning"]  # fmt: skip
TUNED = "gateway+tuned/uvicorn"
DRIP = "drip-10-5"  # 10 chunks, the first at once, then one every 5 ms


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seconds", type=float, default=2.0, help="length of each load run")
    p.add_argument("--concurrency", default="1,32,256", help="comma-separated")
    p.add_argument("--repeat", type=int, default=2, help="runs per cell; the best is kept")
    p.add_argument("--servers", default="uvicorn,granian", help="gateway servers to compare")
    p.add_argument("--streams", type=int, default=1000, help="open streams for the RSS test")
    p.add_argument("--drips", type=int, default=100, help="dripping streams timed per target")
    p.add_argument("--prototype", action="store_true", help="add bench/tuned.py's target")
    p.add_argument("--workers", type=int, default=2,
                   help="also run the gateway as `serve --workers N` (0 or 1: skip)")  # fmt: skip
    p.add_argument("--no-profile", action="store_true", help="skip py-spy")
    p.add_argument("--loadgen", choices=["auto", "wrk", "py"], default="auto")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    quick = "a smoke run: 1 s runs, 1 repeat, 200 streams, 20 drips, no profile"
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.streams, args.drips, args.no_profile = 1.0, 200, 20, True
        args.repeat = 1
    return args


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _post(server: Server, model: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", chat_body(model, False),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{server.name} answered {resp.status}: {body[:300]!r}")
    finally:
        conn.close()


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        wrk = None if args.loadgen == "py" else find_wrk(not args.no_install)
        if args.loadgen == "wrk" and wrk is None:
            raise SystemExit("bench: wrk not found")
        self.load = Load(wrk, workdir)
        self.conc = [int(c) for c in args.concurrency.split(",")]
        self.servers: dict[str, Server] = {}
        self.r = Results(
            started=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            loadgen=self.load.name, seconds=args.seconds, repeat=args.repeat, concurrency=self.conc,
            hold_count=args.streams,
        )  # fmt: skip

    def _start(self, name: str, argv: list[str], **kw: object) -> Server:
        port = free_port()
        config = str(self.workdir / "models.yaml")
        argv = [a.replace("{port}", str(port)).replace("{config}", config) for a in argv]
        print(f"bench: starting {name} on port {port}", flush=True)
        server = start(name, argv, port, self.workdir, **kw)  # type: ignore[arg-type]
        self.servers[name] = server
        return server

    def start_all(self) -> None:
        up = self._start(DIRECT, [PY, "-m", "bench.upstream", "--port", "{port}"])
        config = self.workdir / "models.yaml"
        config.write_text(_CONFIG.format(up=up.port, refused=free_port(), drip=DRIP))
        self._start(FLOOR, [PY, "-m", "bench.floor", "--port", "{port}", "--upstream", up.url])
        cfg = str(config)
        env = {"OMNIMIND_CONFIG": cfg}
        for server in self.args.servers.split(","):
            if server not in ("uvicorn", "granian"):
                raise SystemExit(f"bench: unknown server {server!r} (uvicorn, granian)")
            argv = _UVICORN_GATEWAY if server == "uvicorn" else [*_GRANIAN, "bench.asgi:app"]
            self._start(f"gateway/{server}", argv, env=env, health="/health")
            self.r.gateways[f"gateway/{server}"] = GatewayStats()
        if "uvicorn" in self.args.servers.split(",") and self.args.workers > 1:
            workers = [*_UVICORN_GATEWAY, "--workers", str(self.args.workers)]
            self._start(f"gateway/uvicorn x{self.args.workers}", workers, env=env, health="/health")
        if self.args.prototype:
            argv = [PY, "-m", "bench.tuned", "--config", cfg, "--port", "{port}"]
            self._start(TUNED, [*argv, "--patch"], health="/health")
        for name, server in self.servers.items():
            _post(server, "bench")
            self.r.idle_rss[name] = server.rss_mb()
            if name in self.r.gateways:
                self.r.gateways[name].idle_rss = self.r.idle_rss[name]
            parts = server.tree()
            if len(parts) > 1:
                sizes = " + ".join(f"{p.memory_info().rss / 2**20:.1f}" for p in parts)
                self.r.notes.append(f"{name} runs {len(parts)} processes; idle RSS {sizes} MB")

    def run_load(self, server: Server, model: str, stream: bool, conc: int) -> Row:
        up = self.servers[DIRECT]
        cpu0, up0 = server.cpu_s(), up.cpu_s()
        res = self.load.run(server.url, chat_body(model, stream), conc, self.args.seconds)
        cpu, up_cpu = server.cpu_s() - cpu0, up.cpu_s() - up0
        return Row(res, cpu / max(res.requests, 1) * 1e6, up_cpu / res.seconds * 100)

    def matrix(self) -> None:
        """Every target at every concurrency, interleaved so drift hits all alike."""
        for server in self.servers.values():  # warm pools and code paths
            for stream in (False, True):
                self.load.run(server.url, chat_body("bench", stream), 32, 1)
        for stream in (False, True):
            for conc in self.conc:
                for _ in range(self.args.repeat):
                    for name, server in self.servers.items():
                        self._cell(name, server, stream, conc)

    def _cell(self, name: str, server: Server, stream: bool, conc: int) -> None:
        row = self.run_load(server, "bench", stream, conc)
        best = self.r.rows.get((name, stream, conc))
        if best is None or row.load.rps > best.load.rps:
            self.r.rows[(name, stream, conc)] = row
        ld = row.load
        print(
            f"bench: {name:18} stream={stream!s:5} c={conc:<4} {ld.rps:9,.0f} req/s"
            f"  p50 {ld.p50_ms:.2f} ms  p99 {ld.p99_ms:.2f} ms  errors {ld.errors}",
            flush=True,
        )

    def drips(self) -> None:
        names = list(self.servers)
        bare = (DIRECT, FLOOR)  # these take the upstream's model name, the rest the alias
        targets = [(s.url, DRIP if n in bare else "drip") for n, s in self.servers.items()]
        timed = uvloop.run(streams.drip(targets, self.args.drips, 60.0))
        self.r.drips = dict(zip(names, timed, strict=True))
        print(f"bench: timed {len(timed[0].ttft_ms)} dripping streams per target", flush=True)

    def fallback(self) -> None:
        seconds = min(self.args.seconds, 2.0)
        for name, stats in self.r.gateways.items():
            server = self.servers[name]
            for alias in ("bench", "bench-fallback", "bench-fallback-breaker"):
                stats.fallback[alias] = self.load.run(
                    server.url, chat_body(alias, False), 1, seconds
                )

    def hold(self) -> None:
        for name, stats in self.r.gateways.items():
            server = self.servers[name]
            stats.hold_before = server.rss_mb()
            stats.hold_open, stats.hold_rss = uvloop.run(
                streams.hold(server.url, "hold", self.args.streams, server.rss_mb)
            )
            print(f"bench: {name} held {stats.hold_open} streams, RSS {stats.hold_rss:.1f} MB",
                  flush=True)  # fmt: skip
            time.sleep(1.0)  # let the gateway close its upstream streams

    def loaded_rss(self) -> None:
        for name, stats in self.r.gateways.items():
            stats.loaded_rss = self.servers[name].rss_mb()

    def profiles(self) -> None:
        if profile.py_spy() is None:
            self.r.notes.append("no profile: py-spy not found (pip install py-spy)")
            return
        seconds = max(3, int(self.args.seconds) + 1)
        cases = [
            ("gateway/uvicorn", False),
            ("gateway/uvicorn", True),
            (TUNED, False),
            (TUNED, True),
        ]
        for name, stream in cases:
            server = self.servers.get(name)
            if server is None:
                continue
            raw = self.workdir / f"profile-{name.replace('/', '-')}-{stream}.txt"
            spy = profile.record(server.worker_pid(), seconds, raw)
            time.sleep(0.5)
            self.load.run(server.url, chat_body("bench", stream), 32, seconds)
            spy.wait(timeout=seconds + 30)
            title = f"{name}, {'stream' if stream else 'non-stream'}, conc 32"
            if raw.exists():
                self.r.profiles.append(profile.markdown(title, profile.summarize(raw)))
            print(f"bench: profiled {title}", flush=True)

    def stop(self) -> None:
        for server in reversed(self.servers.values()):
            server.stop()


def _write(text: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    path, n = out / f"{day}.md", 1
    while path.exists():
        n += 1
        path = out / f"{day}-{n}.md"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    _raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="omnimind-bench-"))
    bench = Bench(args, workdir)
    started = time.monotonic()
    try:
        bench.start_all()
        bench.hold()  # first, on fresh processes: what the streams themselves add
        bench.matrix()
        bench.drips()
        bench.fallback()
        bench.loaded_rss()
        if not args.no_profile:
            bench.profiles()
    except BaseException:
        print(f"bench: failed; the servers' logs are in {workdir}")
        raise
    finally:
        bench.stop()
    bench.r.micro = micro.markdown(micro.run())
    rows = bench.r.rows.items()
    up = max((row.upstream_pct for (t, _, _), row in rows if t != DIRECT), default=0)
    bench.r.notes.append(
        f"the upstream never used more than {up:.0f}% of a core while serving the other "
        "targets (its own capacity is the direct rows)"
    )
    bench.r.notes.append(f"whole run: {time.monotonic() - started:.0f} s")
    text = markdown(bench.r)
    print(text)
    print(f"bench: written to {_write(text, Path(args.out))}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
