"""The worker (hf_worker) with a runner of its own: prompts that join together run in one
call, and a prompt that fails in such a batch fails only its own request."""

from __future__ import annotations

import threading
from typing import Any

import torch

from proxy.providers.hf_generate import Done, Params, TextFeed
from proxy.providers.hf_worker import Job, Sampling, Worker

EOS, POISON, GATE, VOCAB = 2, 13, 1, 16


class Runner:
    """The worker's protocol over no model: a prompt holding POISON cannot run, the prompt
    [GATE] waits for `opened`; every prompt's next token is EOS. Its calls are recorded."""

    slots, vocab, max_positions = 4, VOCAB, 1000

    def __init__(self) -> None:
        self.batches: list[list[list[int]]] = []
        self.opened, self.entered = threading.Event(), threading.Event()

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        return self.prefill_many([slot], [ids])[0]

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        self.batches.append(prompts)
        if prompts == [[GATE]]:
            self.entered.set()
            assert self.opened.wait(10)
        if any(POISON in ids for ids in prompts):
            raise RuntimeError("this prompt cannot run")
        logits = torch.zeros(len(prompts), VOCAB)
        logits[:, EOS] = 1.0
        return logits

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        raise AssertionError("every answer ends at its prompt")

    def move(self, source: int, target: int) -> None:
        pass


class _Tokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)


def test_a_prompt_that_fails_in_a_batch_fails_only_its_own_request() -> None:
    runner = Runner()
    ends: dict[int, Any] = {}
    done = threading.Event()

    def job(i: int, prompt: list[int]) -> Job:
        def finish(result: Done | BaseException | None) -> None:
            ends[i] = result
            if len(ends) == 4:
                done.set()

        feed = TextFeed(_Tokenizer(), (), threading.Event(), lambda text: None)
        return Job(prompt, Params([], max_new_tokens=4), feed, finish)

    worker = Worker(runner, Sampling(eos_ids=frozenset({EOS})), name="test-worker")
    try:
        worker.submit(job(3, [GATE]))  # the worker is busy with it while the others queue
        assert runner.entered.wait(10)
        for i, prompt in enumerate([[5, 6], [7, POISON], [8]]):
            worker.submit(job(i, prompt))
        runner.opened.set()
        assert done.wait(10)
    finally:
        worker.close()
    assert runner.batches[1] == [[5, 6], [7, POISON], [8]]  # together first
    assert runner.batches[2:] == [[[5, 6]], [[7, POISON]], [[8]]]  # then each alone
    assert isinstance(ends[1], RuntimeError)
    assert ends[0] == Done("stop", 2, 0) and ends[2] == Done("stop", 1, 0)
    assert worker.stats.jobs == 4
