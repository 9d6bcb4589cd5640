"""The fast decoder's decode step compiled by `torch.compile`, swapped in once it is ready.

Eagerly, a decode step of SmolLM2-135M is about 2,000 small ATen calls, and dispatching
them is most of the step: ~30 ms a token on 2 cores, where the int8 matmuls take ~7.
Inductor fuses everything between the matmuls into a few C++ loops: ~14 ms a token
(`bench.hf_bench` has the figures). Compiling costs about a minute of CPU the first time
(inductor writes C++ and builds it with the system compiler) and a few seconds after, from
inductor's cache, kept in the gateway's cache folder (`hf_cache.cache_root()/inductor`).

So the model answers at once, eagerly. Once it has been quiet for `QUIET_S`, a background
thread compiles two steps against scratch caches (never the live one): one row, and several
rows, with the cache length symbolic in both, and then swaps them in. A step the compiled
code does not cover (it would have to compile again) runs eagerly: a request never waits for
a compile. The int8 matmuls are exact either way; the fused float kernels add in another
order, so a compiled answer agrees with the eager one up to float rounding.

`compile` (the provider setting): `auto` compiles on the CPU when a C++ compiler is found,
unless `$OMNIMIND_COMPILE` is `off` (for a whole process: CI, tests); `on` compiles whatever
that says, and logs why it could not; `off` never compiles.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from . import hf_cache
from .hf_fast import FastDecoder
from .hf_weights import describe, log

QUIET_S = 1.5  # the model has decoded nothing for this long: compiling will not slow an answer
COMPILE_THREAD = "omnimind-hf-compile"


def why_not(runner: Any, mode: str) -> str | None:
    """Why this runner's decode step is not compiled (None: it is)."""
    if mode == "off":
        return "compile: off"
    if mode == "auto" and os.environ.get("OMNIMIND_COMPILE", "").lower() == "off":
        return "OMNIMIND_COMPILE=off"
    if not isinstance(runner, FastDecoder):
        return "only the fast decoder's step compiles"
    if runner.device != "cpu":
        return f"compiling is measured on the CPU only, not on {runner.device}"
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def start(runner: Any, mode: str, busy: Callable[[], bool], stopped: Callable[[], bool]) -> None:
    """Compile `runner`'s decode step in the background, once `busy()` has been False for
    `QUIET_S` (unless `stopped()` first); returns at once."""
    reason = why_not(runner, mode)
    if reason is not None:
        if mode == "on":
            log.warning("decode step not compiled: %s", reason)
        if isinstance(runner, FastDecoder):
            runner.compile_status = f"off ({reason})"
        return
    runner.compile_status = "waiting"  # for the model to be quiet
    # A daemon: a process that exits mid-compile must not wait a minute for it.
    thread = threading.Thread(
        target=_compile, args=(runner, busy, stopped), name=COMPILE_THREAD, daemon=True
    )
    thread.start()


def wait_quiet(busy: Callable[[], bool], quiet_s: float, give_up: Callable[[], bool]) -> bool:
    """Block until `busy()` has been False for `quiet_s` (True), or `give_up()` (False)."""
    quiet_since = time.monotonic()
    while (now := time.monotonic()) - quiet_since < quiet_s:
        if give_up():
            return False
        if busy():
            quiet_since = now
        time.sleep(0.05)
    return True


def _compile(runner: FastDecoder, busy: Callable[[], bool], stopped: Callable[[], bool]) -> None:
    if not wait_quiet(busy, QUIET_S, stopped):
        runner.compile_status = "off (closed)"
        return
    runner.compile_status = "compiling"
    started = time.perf_counter()
    log.info("compiling the decode step (a minute the first time, seconds after)")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(hf_cache.cache_root() / "inductor"))
    try:
        compiled = CompiledStep()
        for rows in range(1, min(2, runner.slots) + 1):
            if stopped():
                runner.compile_status = "off (closed)"
                return
            compiled.warm(runner, rows)
    except Exception as exc:  # noqa: BLE001 - any failure leaves the eager step in place
        log.warning("cannot compile the decode step (%s): decoding eagerly", describe(exc))
        runner.compile_status = f"failed ({describe(exc)})"
        return
    runner.compiled = compiled
    runner.compile_status = "ready"
    log.info("decode step compiled in %.1f s", time.perf_counter() - started)


class CompiledStep:
    """`FastDecoder.forward` for one token a row, compiled; eager where it would recompile."""

    def __init__(self) -> None:
        self._step = torch.compile(FastDecoder.forward, fullgraph=True)

    def warm(self, runner: FastDecoder, rows: int) -> None:
        """Compile for `rows` rows (1, or any number from 2 up to the slots) against scratch
        caches."""
        with torch.inference_mode():  # as the worker decodes: tensors and grad mode are guarded
            self._warm(runner, rows)

    def _warm(self, runner: FastDecoder, rows: int) -> None:
        capacity = 16  # any length: it is marked symbolic
        shape = (runner.slots, runner.kv_heads, capacity, runner.head_dim)
        keys = [torch.zeros(shape, dtype=runner.dtype) for _ in runner.layers]
        values = [torch.zeros_like(k) for k in keys]
        ids = torch.zeros((rows, 1), dtype=torch.long)
        pos = torch.arange(rows)[:, None]
        mask = (torch.arange(capacity)[None, :] <= pos)[:, None, None]
        for cache in keys + values:
            torch._dynamo.mark_dynamic(cache, 2)
        torch._dynamo.mark_dynamic(mask, 3)
        if rows > 1:  # one row stays a graph of its own: a size of 1 is never symbolic
            for tensor in (ids, pos, mask):  # "maybe": with 2 slots, 2 rows is the only case
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        self._step(runner, ids, pos, None, mask, keys, values)

    def __call__(self, runner: FastDecoder, *args: Any) -> torch.Tensor:
        with torch.compiler.set_stance("eager_on_recompile"):
            out: torch.Tensor = self._step(runner, *args)
        return out
