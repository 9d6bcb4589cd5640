"""One worker thread per local model: a queue of jobs, decoded together (continuous batching).

A job arrives with its prompt already templated and tokenised (`hf_generate.prepare`), so
a prompt the template refuses fails only its own request. The worker takes queued jobs
whenever a batch row is free, between two decoding steps: a request that arrives while
others are decoding joins them at the next step instead of waiting for them to finish.
Requests that join together have their prompts run together (`prefill_many`: one pass
where the runner can, each prompt's logits the same bits as alone).
Each step decodes one token for every row; each row has its own position, sampling
settings (a seeded row samples from its own generator, so its answer does not depend on
its neighbours), token budget, stop strings, output grammar and cancellation. A row that
ends leaves at once and its cache slot is reused.

The worker sleeps on a condition while there is nothing to do: no polling. A failure in
one row's prompt fails that row; a failure of a whole step fails the rows in it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import UpstreamError
from .hf_generate import Done, Params, TextFeed, held_events

log = logging.getLogger("omnimind.huggingface")
GENERATE_THREAD = "omnimind-hf-generate"
_RUNNING: weakref.WeakSet[Worker] = weakref.WeakSet()  # for `rows_in_flight` alone


QUIET_S = 1.5  # a model has decoded nothing this long: background work will not slow an answer


def wait_quiet(busy: Callable[[], bool], give_up: Callable[[], bool]) -> bool:
    """Block until `busy()` has been False for `QUIET_S` (True), or `give_up()` (False)."""
    quiet_since = time.monotonic()
    while (now := time.monotonic()) - quiet_since < QUIET_S:
        if give_up():
            return False
        if busy():
            quiet_since = now
        time.sleep(0.05)
    return True


def rows_in_flight() -> int:
    """Rows decoding or queued in every worker of this process (tests, diagnostics)."""
    return sum(w.stats.in_flight for w in list(_RUNNING))


class Runner(Protocol):
    """The model's forward passes over a cache of `slots` rows (`hf_fast`, `hf_runner`)."""

    slots: int
    vocab: int
    max_positions: int

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor: ...

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor: ...

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor: ...

    def move(self, source: int, target: int) -> None: ...


@dataclass(eq=False, slots=True)
class Job:
    """One request for the worker: its prompt ids, settings, and where its output goes."""

    prompt: list[int]
    params: Params
    feed: TextFeed
    finish: Callable[[Done | BaseException | None], None]  # None: halted, nobody waits
    matcher: Any = None  # an `hf_grammar` matcher, when the output is constrained


@dataclass(slots=True)
class WorkerStats:
    """Counters a test or an operator can read (never parsed from the log)."""

    jobs: int = 0
    joined: int = 0  # jobs that joined rows already decoding
    steps: int = 0
    tokens: int = 0
    widest: int = 0  # the most rows decoded in one step
    active: int = 0  # rows decoding now
    waiting: int = 0  # jobs queued for a free row

    @property
    def in_flight(self) -> int:
        return self.active + self.waiting


@dataclass(eq=False, slots=True)
class _Row:
    job: Job
    slot: int
    position: int  # where the last sampled token goes into the cache
    token: int = 0
    generated: int = 0
    rng: torch.Generator | None = None
    result: Done | None = None
    ended: bool = False


@dataclass(slots=True)
class Sampling:
    eos_ids: frozenset[int]
    top_k: int = 0  # the model's own generation config may ask for one; OpenAI's API has none


class Worker:
    def __init__(self, runner: Runner, sampling: Sampling, name: str = GENERATE_THREAD) -> None:
        self.runner = runner
        self.sampling = sampling
        self.stats = WorkerStats()
        self._queue: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _RUNNING.add(self)

    def submit(self, job: Job) -> None:
        with self._changed:
            if self._closed:
                raise UpstreamError("unavailable", "provider is closed")
            self._queue.append(job)
            self.stats.waiting = len(self._queue)
            self._changed.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the loop

    def _loop(self) -> None:
        rows: list[_Row] = []
        while True:
            with self._changed:
                while not (self._queue or rows or self._closed):
                    self._changed.wait()
                if self._closed:
                    break
                room = self.runner.slots - len(rows)
                joining = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
                self.stats.waiting = len(self._queue)
                self.stats.active = len(rows) + len(joining)
            with held_events():  # the step's text reaches each event loop in one call
                rows = self._retire(rows + self._start(joining, len(rows), bool(rows)))
                self.stats.active = len(rows)
                if rows:
                    self._step(rows)
                    rows = self._retire(rows)
                    self.stats.active = len(rows)
        self.stats.active = self.stats.waiting = 0
        closed = UpstreamError("unavailable", "provider is closed")
        for row in rows:
            row.job.finish(closed)
        with self._changed:
            waiting, self._queue = list(self._queue), collections.deque()
        for job in waiting:
            job.finish(closed)

    def _start(self, jobs: list[Job], first_slot: int, joining: bool) -> list[_Row]:
        """Run the jobs' prompts into slots from `first_slot` (together, where the runner
        can) and take each one's first token; the rows that go on decoding."""
        ready = []
        for job in jobs:
            if job.feed.halt.is_set():
                job.finish(None)
                continue
            self.stats.jobs += 1
            self.stats.joined += joining
            if len(job.prompt) >= self.runner.max_positions:
                job.finish(UpstreamError(
                    "context_too_long",
                    f"the prompt is {len(job.prompt)} tokens; this model reads at most "
                    f"{self.runner.max_positions}",
                ))  # fmt: skip
            else:
                ready.append(job)
        rows = [
            _Row(job, first_slot + i, len(job.prompt), rng=_generator(job.params))
            for i, job in enumerate(ready)
        ]
        if not rows:
            return []
        try:
            with torch.inference_mode():
                logits = list(
                    self.runner.prefill_many([r.slot for r in rows], [j.prompt for j in ready])
                )
        except Exception as exc:  # noqa: BLE001 - these prompts' failure only
            logits = [exc] if len(rows) == 1 else [self._alone(row) for row in rows]
        going = []
        for row, row_logits in zip(rows, logits, strict=True):
            try:
                if isinstance(row_logits, BaseException):
                    raise row_logits
                self._take(row, row_logits)
            except Exception as exc:  # noqa: BLE001 - this job's failure only
                row.job.finish(exc)
                continue
            if row.ended:
                self._end(row)
            else:
                going.append(row)
        return going

    def _alone(self, row: _Row) -> torch.Tensor | BaseException:
        """One prompt of a batch that failed, run by itself: only a prompt that fails
        alone fails its request."""
        try:
            with torch.inference_mode():
                return self.runner.prefill_many([row.slot], [row.job.prompt])[0]
        except Exception as exc:  # noqa: BLE001 - this job's failure only
            return exc

    def _step(self, rows: list[_Row]) -> None:
        self.stats.steps += 1
        self.stats.widest = max(self.stats.widest, len(rows))
        try:
            with torch.inference_mode():
                logits = self.runner.decode([r.token for r in rows], [r.position for r in rows])
        except Exception as exc:  # noqa: BLE001 - every row of the step fails with it
            log.error("local generation failed: %s", exc)
            for row in rows:
                row.ended = True
                row.job.finish(exc)
            return
        for i, row in enumerate(rows):
            row.position += 1
            try:
                self._take(row, logits[i])
            except Exception as exc:  # noqa: BLE001 - e.g. a grammar that cannot go on
                row.ended = True
                row.job.finish(exc)
                continue
            if row.ended:
                self._end(row)

    def _take(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token from `logits` and hand it on; decide if the row ends."""
        job = row.job
        if job.feed.halt.is_set():
            row.ended = True
            return
        if job.matcher is not None:
            job.matcher.mask(logits)
        token = _sample(logits, job.params, row.rng, self.sampling.top_k)
        self.stats.tokens += 1
        row.token = token
        if job.matcher is not None:
            job.matcher.accept(token)
        if token in self.sampling.eos_ids:
            row.result = self._done(row, "stop")
            return
        row.generated += 1
        job.feed.add([token])
        if job.feed.stop_hit or (job.matcher is not None and job.matcher.finished()):
            row.result = self._done(row, "stop")
        elif row.generated >= job.params.max_new_tokens:
            row.result = self._done(row, "length")
        elif row.position + 1 >= self.runner.max_positions:
            row.result = self._done(row, "length")

    def _done(self, row: _Row, reason: str) -> Done:
        row.ended = True
        return Done(reason, len(row.job.prompt), row.generated)

    def _end(self, row: _Row) -> None:
        job = row.job
        if row.result is None:  # halted: the request is gone
            job.finish(None)
            return
        try:
            job.feed.end()
        finally:
            job.finish(row.result)

    def _retire(self, rows: list[_Row]) -> list[_Row]:
        """The rows still decoding, moved into slots `0..n-1` (a freed slot takes the last)."""
        alive = [r for r in rows if not r.ended]
        taken = {r.slot for r in alive}
        free = [s for s in range(len(alive)) if s not in taken]
        for row in alive:
            if row.slot >= len(alive):
                target = free.pop(0)
                with torch.inference_mode():
                    self.runner.move(row.slot, target)
                row.slot = target
        alive.sort(key=lambda r: r.slot)
        return alive


def _generator(params: Params) -> torch.Generator | None:
    if not params.sample:
        return None
    rng = torch.Generator()
    if params.seed is not None:
        rng.manual_seed(params.seed % 2**64)
    else:
        rng.seed()
    return rng


def _greedy(logits: torch.Tensor) -> int:
    """The first highest logit's index, as `argmax` gives it; by numpy on the CPU (4.5 µs for
    SmolLM2's 49,152 logits, where torch's argmax took ~70 µs: 8 of them a step at 8 rows)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return int(logits.numpy().argmax())
    return int(logits.argmax())


def _sample(logits: torch.Tensor, params: Params, rng: torch.Generator | None, top_k: int) -> int:
    if rng is None:
        return _greedy(logits)
    scores = logits.float() / params.temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1)
    if params.top_p is not None and params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_probs, -1) - sorted_probs > params.top_p
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=rng))
