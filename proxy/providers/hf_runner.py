"""The worker's forward passes for any `transformers` causal LM (models `hf_fast` cannot run).

Each row keeps its own `DynamicCache`; a step runs the model once per row. Slower than
`hf_fast` (no batched matmuls), but it serves every architecture `transformers` loads,
with the same queue, continuous batching, sampling and cancellation around it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache


class HFRunner:
    def __init__(self, model: Any, device: str, slots: int) -> None:
        self.model = model
        self.device = device
        self.slots = slots
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 2**31)
        self._caches: list[DynamicCache | None] = [None] * slots
        accepted = inspect.signature(model.forward).parameters
        # transformers 5 names the argument `cache`; earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self._positions = "position_ids" in accepted

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        cache = DynamicCache(config=self.model.config)
        tokens = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=tokens, use_cache=True, **{self._cache_arg: cache})
        self._caches[slot] = cache
        return out.logits[0, -1].float()

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        return torch.stack([self.prefill(s, ids) for s, ids in zip(slots, prompts, strict=True)])

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        rows = []
        for slot, (token, position) in enumerate(zip(tokens, positions, strict=True)):
            where = torch.tensor([[position]], device=self.device)
            out = self.model(
                input_ids=torch.tensor([[token]], device=self.device),
                use_cache=True,
                **({"position_ids": where} if self._positions else {}),
                **{self._cache_arg: self._caches[slot]},
            )
            rows.append(out.logits[0, -1].float())
        return torch.stack(rows)

    def move(self, source: int, target: int) -> None:
        self._caches[target], self._caches[source] = self._caches[source], None
