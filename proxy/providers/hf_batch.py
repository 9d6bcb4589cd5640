"""Batched local generation: requests that wait for the same model run as one `generate()`.

With `max_batch: N` (> 1) a request's worker thread does not wait for the model alone. It
puts a `Job` in the model's queue and competes for the model's lock. The thread that gets
the lock waits up to `batch_wait_ms` for the queue to hold N jobs, takes the oldest
waiting job plus up to N - 1 more that can share its decoding settings, runs them as one
left-padded batch, and finishes every job it took before it
lets go of the lock. So a thread that gets the lock and finds its own job still queued
knows that nobody is running it. This is static batching: a request that arrives while a
batch runs waits for the next one. The short wait keeps N clients that each send their
next request when the last one ends from falling into lock-step, one request per batch.

Jobs share a batch when their decoding matches: all greedy, or sampling with the same
temperature and top_p and no `seed`. A seeded request runs alone, so its answer repeats.
Each row keeps its own token budget, stop strings and cancellation. A per-row
`StoppingCriteria` ends a row that was halted or has used its `max_tokens`, and
`BatchFeed` hands each row's tokens to that request's `TextFeed`, until the row ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .hf_generate import (
    Done,
    Params,
    TextFeed,
    encode_prompt,
    generate,
    generate_unlocked,
    generation_config,
    random_state,
)
from .hf_weights import LoadedModel, log


@dataclass(eq=False, slots=True)
class Job:
    """One request waiting for, or running in, a batch."""

    params: Params
    halt: threading.Event
    emit: Callable[[str], None]
    finished: threading.Event = field(default_factory=threading.Event)
    result: Done | None = None
    error: BaseException | None = None

    def key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys can share a batch; None: this one runs alone."""
        p = self.params
        if not p.sample:
            return ("greedy",)
        return None if p.seed is not None else ("sample", p.temperature, p.top_p)


def _take(loaded: LoadedModel, limit: int) -> list[Job]:
    """The oldest live waiting job and up to `limit - 1` more that share its key."""
    with loaded.waiting_changed:
        live: list[Job] = [j for j in loaded.waiting if not j.halt.is_set()]
        if not live:
            loaded.waiting = []
            return []
        key = live[0].key()
        batch = [live[0]]
        if key is not None:
            batch += [j for j in live[1:] if j.key() == key][: limit - 1]
        loaded.waiting = [j for j in live if j not in batch]
        return batch


def _withdraw(loaded: LoadedModel, job: Job) -> bool:
    """Take `job` back if no batch has it yet."""
    with loaded.waiting_changed:
        if job in loaded.waiting:
            loaded.waiting.remove(job)
            return True
        return False


def generate_batched(
    loaded: LoadedModel,
    params: Params,
    halt: threading.Event,
    emit: Callable[[str], None],
    max_batch: int,
    wait: float = 0.0,
) -> Done | None:
    """Like `generate()`, but shares `generate()` calls with other waiting requests.

    The request that starts a batch first waits up to `wait` seconds for the batch to fill.
    """
    if max_batch <= 1:
        return generate(loaded, params, halt, emit)
    job = Job(params, halt, emit)
    with loaded.waiting_changed:
        loaded.waiting.append(job)
        loaded.waiting_changed.notify_all()
    while not job.finished.is_set():
        if halt.is_set() and _withdraw(loaded, job):
            return None  # given up before any batch took it
        if not loaded.lock.acquire(timeout=0.02):
            continue
        try:
            if job.finished.is_set():
                break
            with loaded.waiting_changed:  # give a batch that is not full a moment to fill
                loaded.waiting_changed.wait_for(
                    lambda: len(loaded.waiting) >= max_batch, timeout=wait
                )
            batch = _take(loaded, max_batch)
            if batch:
                _run(loaded, batch)
        finally:
            loaded.lock.release()
    if job.error is not None:
        raise job.error
    return job.result


def _run(loaded: LoadedModel, batch: list[Job]) -> None:
    """Run `batch` (the model's lock held); every job is finished when this returns."""
    try:
        if len(batch) == 1:
            job = batch[0]
            job.result = generate_unlocked(loaded, job.params, job.halt, job.emit)
        else:
            _run_many(loaded, batch)
    except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
        for job in batch:
            job.error = exc
        if not isinstance(exc, Exception):
            raise
    finally:
        for job in batch:
            job.finished.set()


class BatchFeed:
    """A generate() streamer for a batch: row i's tokens go to `feeds[i]` until it ends."""

    def __init__(self, feeds: list[TextFeed], budgets: list[int], eos: tuple[int, ...]) -> None:
        self.feeds = feeds
        self.budgets = budgets
        self.eos = frozenset(eos)
        self.ended = [False] * len(feeds)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.ended[i]:
                continue
            feed = self.feeds[i]
            feed.add([int(token)])
            if (
                token in self.eos
                or feed.stop_hit
                or feed.halt.is_set()
                or len(feed.ids) >= self.budgets[i]
            ):
                self.ended[i] = True

    def end(self) -> None:
        for feed in self.feeds:
            feed.end()


class _RowsEnded(StoppingCriteria):
    """Per row: stop once `BatchFeed` has ended it (halted, stop string, its own budget)."""

    def __init__(self, feed: BatchFeed) -> None:
        self.feed = feed

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        ended = [
            e or f.halt.is_set() for e, f in zip(self.feed.ended, self.feed.feeds, strict=True)
        ]
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


def _run_many(loaded: LoadedModel, batch: list[Job]) -> None:
    # built on the CPU, moved to the model's device once
    prompts = [encode_prompt(loaded, j.params.messages)["input_ids"][0].cpu() for j in batch]
    width = max(len(p) for p in prompts)
    pad = loaded.pad_id if loaded.pad_id is not None else loaded.eos_ids[0]
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left padding: every row ends where decoding starts
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    feeds = [TextFeed(loaded.tokenizer, j.params.stops, j.halt, j.emit) for j in batch]
    budgets = [j.params.max_new_tokens for j in batch]
    feed = BatchFeed(feeds, budgets, loaded.eos_ids)
    head = batch[0].params
    config = generation_config(loaded, head)
    config.max_new_tokens = max(budgets)
    started = time.perf_counter()
    with random_state(head), torch.inference_mode():
        loaded.model.generate(
            input_ids=ids.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            generation_config=config,
            streamer=feed,
            stopping_criteria=StoppingCriteriaList([_RowsEnded(feed)]),
        )
    count = sum(len(f.ids) for f in feeds)
    log.debug("batch of %d: %d tokens in %.2f s", len(batch), count, time.perf_counter() - started)
    for job, row, prompt in zip(batch, feeds, prompts, strict=True):
        if row.stop_hit or (row.ids and row.ids[-1] in loaded.eos_ids):
            reason = "stop"
        elif job.halt.is_set():
            job.result = None
            continue
        else:
            reason = "length"
        job.result = Done(reason, len(prompt), len(row.ids))
