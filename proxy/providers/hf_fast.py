"""A lean decoder for Llama-shaped models: packed weights, slot KV cache, no `generate()`.

`transformers` converts what needs converting (a GGUF file, a hub checkpoint); decoding
runs here, and a restart from the converted-weights cache needs no `transformers`. Per
layer: one fused q/k/v matmul, rotary embedding, the new key and value written into the
row's slot of a KV cache (float16 with int8 weights: half the bytes a step reads, as
llama.cpp keeps it), attention, one fused gate/up matmul.
Each row of a batch has its own position and length, so a request can join a batch
that is decoding (continuous batching) and leave it at any step: rows are slots `0..B-1`
of the cache, and a row that leaves gives its slot to the last row (`move`). Where the
C++ attention is loaded (`hf_attend`), prompts run as rows of tokens, each row in its
prompt's slot at its own position, so prompts joining together share one pass (their
weights read once) and a prompt's logits are the same bits alone or beside others.

Weights (`packing`). `int8`: every matmul (q/k/v, o, gate/up, down and the output head)
multiplies int8 by int8 into int32, with per-channel weight scales and activations
quantised per row (`hf_int8.Int8`), so a row's outlier channels cost only that row some
resolution; the kernel (`_int_mm` or fbgemm) is chosen by the CPU (`hf_int8`). bfloat16
weights for `down_proj` were tried: CPUs without bfloat16 instructions multiply them
slowly, a 38-token prompt took 150 ms instead of 60. The token embedding is kept in
bfloat16 and widened per lookup. `none`: every weight in the compute dtype. What each
costs is measured by `bench.hf_bench`.

Supported: `model_type` llama, mistral (no sliding window) and qwen2, with the default
rotary embedding; other models run on `hf_runner.HFRunner`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from . import hf_attend
from .hf_int8 import Dense, Int8, best_kernel, prepare

SUPPORTED = frozenset({"llama", "mistral", "qwen2"})
WIDTH_STEP = 32  # a compiled step's attention width is a multiple of it
PASS_TOKENS = 1024  # prompts run together in passes of at most this many tokens
Tensor = torch.Tensor


def supports(config: Any) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if config.model_type == "qwen2":  # qwen2 names a window it only uses when told to
        sliding = bool(getattr(config, "use_sliding_window", False))
    else:
        sliding = getattr(config, "sliding_window", None) is not None
    return (
        config.model_type in SUPPORTED
        and rope.get("rope_type", rope.get("type", "default")) == "default"
        and not sliding
        and getattr(config, "hidden_act", "silu") == "silu"
    )


Kept = dict[str, tuple[Tensor, Tensor]]  # a linear's name -> its int8 values and scales
_LINEARS = {
    "qkv": ("self_attn.", ("q_proj", "k_proj", "v_proj")),
    "o": ("self_attn.", ("o_proj",)),
    "gate_up": ("mlp.", ("gate_proj", "up_proj")),
    "down": ("mlp.", ("down_proj",)),
}


def _linear(packing: str, weight: Tensor, bias: Tensor | None, dtype: Any, kernel: str) -> Any:
    if packing == "int8":
        return Int8(weight, bias, kernel=kernel)
    return Dense(weight.to(dtype), bias)


class Layer:
    def __init__(
        self, weights: Weights, i: int, packing: str, dtype: Any, kept: Kept, kernel: str
    ) -> None:
        self.norm1 = weights.get(f"model.layers.{i}.input_layernorm.weight").to(dtype)
        self.norm2 = weights.get(f"model.layers.{i}.post_attention_layernorm.weight").to(dtype)
        for attribute, (block, parts) in _LINEARS.items():
            prefix, stored = f"model.layers.{i}.{block}", kept.get(f"layers.{i}.{attribute}")
            if packing == "int8" and stored is not None:  # no need to read the weight
                linear: Any = Int8(None, weights.fused_bias(prefix, parts), stored, kernel)
            else:
                linear = _linear(packing, *weights.fused(prefix, parts), dtype, kernel)
            setattr(self, attribute, linear)

    qkv: Any
    o: Any
    gate_up: Any
    down: Any


class Weights:
    """A checkpoint's tensors by `transformers` names (a state dict or a safetensors file)."""

    def __init__(self, tensors: Any, device: str = "cpu") -> None:
        self.tensors = tensors
        self.device = device

    def get(self, name: str) -> Tensor:
        """A tensor of its own (not a view of the file's mapping, which is closed after use)."""
        if hasattr(self.tensors, "get_tensor"):
            return self.tensors.get_tensor(name).to(self.device, copy=True)
        tensor: Tensor = self.tensors[name]
        return tensor.to(self.device)

    def has(self, name: str) -> bool:
        keys = self.tensors.keys()
        return name in keys

    def fused(self, prefix: str, parts: tuple[str, ...]) -> tuple[Tensor, Tensor | None]:
        """The parts' weights stacked into one matrix (and their biases, where any has one)."""
        weight = torch.cat([self.get(f"{prefix}{p}.weight") for p in parts])
        return weight, self.fused_bias(prefix, parts)

    def fused_bias(self, prefix: str, parts: tuple[str, ...]) -> Tensor | None:
        if not any(self.has(f"{prefix}{p}.bias") for p in parts):
            return None
        biases = [
            self.get(f"{prefix}{p}.bias") if self.has(f"{prefix}{p}.bias") else
            torch.zeros(self.get(f"{prefix}{p}.weight").shape[0], device=self.device) for p in parts
        ]  # fmt: skip
        return torch.cat([b.float() for b in biases])


class FastDecoder:
    """The model as packed tensors plus a KV cache of `slots` rows that grows on demand."""

    def __init__(
        self,
        config: Any,
        weights: Weights,
        packing: str,
        device: str,
        dtype: Any,
        slots: int,
        kept: Kept | None = None,
        kernel: str | None = None,
    ) -> None:
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.inner = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        self.device, self.dtype, self.slots = device, dtype, slots
        self.kernel = (kernel or best_kernel()) if packing == "int8" else None  # hf_int8's
        int8_cache = packing == "int8" and dtype == torch.float32  # `none` stays exact
        self.cache_dtype = torch.float16 if int8_cache else dtype
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
        self.inv_freq = 1.0 / (theta ** (steps / self.head_dim))
        kept = kept or {}
        linear_kernel = self.kernel or "int_mm"  # unused unless packing is int8
        with torch.no_grad():
            embed = weights.get("model.embed_tokens.weight")
            with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # packing
                head = pool.submit(
                    self._head, weights, embed, packing, dtype, kept.get("head"), linear_kernel
                )
                build = functools.partial(
                    Layer, weights, packing=packing, dtype=dtype, kept=kept, kernel=linear_kernel
                )
                self.layers = list(pool.map(build, range(config.num_hidden_layers)))
                self.head = head.result()  # the largest matrix, packed beside the layers
            self.embed = embed.to(torch.bfloat16 if packing == "int8" else dtype)
            self.norm = weights.get("model.norm.weight").to(dtype)
        self.vocab = self.head.rows if packing == "int8" else int(self.head.weight.shape[0])
        prepare(self.kernel, wait=False)  # its C++ library: loaded, or built in the background
        self.capacity = 0
        self.pass_tokens = PASS_TOKENS
        self.compiled: Any = None  # hf_compile swaps a compiled `forward` in when it is ready
        self.compile_status = "off"  # hf_compile's: off (why), waiting, compiling, ready, failed
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    @staticmethod
    def _head(
        weights: Weights,
        embed: Tensor,
        packing: str,
        dtype: Any,
        kept: tuple[Tensor, Tensor] | None,
        kernel: str,
    ) -> Any:
        if packing == "int8" and kept is not None:
            return Int8(None, None, kept, kernel)
        head = weights.get("lm_head.weight") if weights.has("lm_head.weight") else embed
        return _linear(packing, head, None, dtype, kernel)

    def quantized(self) -> Kept:
        """Every int8 linear's values and scales by name (empty unless packing is int8)."""
        linears = {"head": self.head} | {
            f"layers.{i}.{name}": getattr(layer, name)
            for i, layer in enumerate(self.layers) for name in _LINEARS
        }  # fmt: skip
        return {k: v.quantized() for k, v in linears.items() if isinstance(v, Int8)}

    def tensors(self) -> dict[str, Tensor]:
        """Every weight by its path (`layers.3.qkv.values`): a compiled step's inputs."""
        found = {"embed": self.embed, "norm": self.norm, "inv_freq": self.inv_freq}
        linears: dict[str, Any] = {"head": self.head}
        for i, layer in enumerate(self.layers):
            found |= {f"layers.{i}.norm1": layer.norm1, f"layers.{i}.norm2": layer.norm2}
            linears |= {f"layers.{i}.{name}": getattr(layer, name) for name in _LINEARS}
        for path, linear in linears.items():
            for name in ("values", "colsum", "scales", "weight", "bias"):
                if isinstance(value := getattr(linear, name, None), Tensor):
                    found[f"{path}.{name}"] = value
        return found

    def with_tensors(self, tensors: dict[str, Tensor]) -> FastDecoder:
        """A shallow copy whose weights are `tensors` (by the paths `tensors()` gives)."""
        twin = copy.copy(self)
        twin.head, twin.layers = copy.copy(self.head), [copy.copy(x) for x in self.layers]
        for layer in twin.layers:
            for name in _LINEARS:
                setattr(layer, name, copy.copy(getattr(layer, name)))
        for path, tensor in tensors.items():
            *parents, last = path.split(".")
            owner: Any = twin
            for part in parents:
                owner = owner[int(part)] if part.isdigit() else getattr(owner, part)
            setattr(owner, last, tensor)
        return twin

    # -- the cache

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (doubling, up to the model's limit)."""
        if length <= self.capacity:
            return
        capacity = min(max(256, self.capacity * 2, length), max(length, self.max_positions))
        shape = (self.slots, self.kv_heads, self.head_dim, capacity)  # keys: positions last
        grown = [
            torch.zeros(shape, dtype=self.cache_dtype, device=self.device) for _ in self.layers
        ]
        grown_values = [torch.zeros_like(k).transpose(2, 3).contiguous() for k in grown]
        for old, new in zip(self.keys, grown, strict=False):  # nothing on the first call
            new[..., : self.capacity] = old
        for old, new in zip(self.values, grown_values, strict=False):
            new[:, :, : self.capacity] = old
        self.keys, self.values, self.capacity = grown, grown_values, capacity

    def move(self, source: int, target: int) -> None:
        """Copy slot `source`'s cache into slot `target` (a row took over a freed slot)."""
        for cache in self.keys + self.values:
            cache[target] = cache[source]

    # -- the forward passes

    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        """Run a prompt into `slot` from position 0; the logits after its last token."""
        if self.tokens_together():  # every prompt one way: the same bits alone or together
            return self.prefill_many([slot], [ids])[0]
        self.reserve(len(ids) + 1)
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        step = self.compiled or FastDecoder.forward
        return step(self, tokens, positions, slot, None, self.keys, self.values)[0]

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> Tensor:
        """Run prompts into their slots from position 0; the logits after each one's last
        token. Where the C++ attention is loaded (`tokens_together`), in one pass, every
        token a row of its own slot at its own position, so a prompt's logits are the same
        bits alone or beside others and its weights are read once for all; else one by one."""
        if not self.tokens_together():
            return torch.stack(
                [self.prefill(s, ids) for s, ids in zip(slots, prompts, strict=True)]
            )
        passes, size = [[0]], len(prompts[0])  # at most `pass_tokens` a pass (a longer
        for i, ids in enumerate(prompts[1:], 1):  # prompt alone): activations stay bounded
            if size + len(ids) > self.pass_tokens:
                passes.append([])
                size = 0
            passes[-1].append(i)
            size += len(ids)
        if len(passes) > 1:
            return torch.cat([
                self.prefill_many([slots[i] for i in p], [prompts[i] for i in p]) for p in passes
            ])  # fmt: skip
        self.reserve(max(len(ids) for ids in prompts) + 1)
        tokens = torch.tensor([t for ids in prompts for t in ids], device=self.device)[:, None]
        positions = torch.cat([torch.arange(len(ids), device=self.device) for ids in prompts])
        owners = [s for s, ids in zip(slots, prompts, strict=True) for _ in ids]
        rows_slots = torch.tensor(owners, device=self.device)
        ends = torch.tensor(list(itertools.accumulate(map(len, prompts))), device=self.device) - 1
        step = self.compiled or FastDecoder.forward
        return step(self, tokens, positions[:, None], None, None, self.keys, self.values,
                    rows_slots, ends)  # fmt: skip

    def tokens_together(self) -> bool:
        """Whether prompts run as rows of tokens (`prefill_many`): the C++ attention takes
        this model's queries and cache."""
        fits = self.dtype == torch.float32 and self.cache_dtype == torch.float16
        return fits and self.head_dim % 16 == 0 and hf_attend.LIBRARY.loaded

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """One step for rows `0..B-1`: row i's token at its position; logits [B, vocab]."""
        self.reserve(max(positions) + 1)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        width = self.capacity if self.compiled is None else self.width(max(positions) + 1)
        mask = (torch.arange(width, device=self.device)[None, :] <= pos)[:, None, None]
        step = self.compiled or FastDecoder.forward
        return step(self, ids, pos, None, mask, self.keys, self.values)

    def width(self, longest: int) -> int:
        """How many cache positions a compiled step attends over: the longest row's length
        rounded up to `WIDTH_STEP`. A masked position adds an exact zero to the compiled
        loops' sums, so a row's logits do not depend on its neighbours (tested bit for bit).
        Eagerly, attention spans the whole cache: SDPA's blocking follows the width, and a
        width that followed the batch flipped near-tied greedy tokens."""
        return min(self.capacity, -(-longest // WIDTH_STEP) * WIDTH_STEP)

    def forward(
        self,
        ids: Tensor,
        pos: Tensor,
        slot: int | Tensor | None,
        mask: Tensor | None,
        keys_cache: list[Tensor],
        values_cache: list[Tensor],
        rows_slots: Tensor | None = None,
        ends: Tensor | None = None,
    ) -> Tensor:
        """The logits after each row's last token; the rows' keys and values go into the caches
        (`slot`: a prompt from position 0; None: one token per row at `pos`, under `mask`, row
        i in slot i or in `rows_slots[i]`; `ends`: only those rows' logits)."""
        rows, length = ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        x = F.embedding(ids, self.embed).to(self.dtype)
        angles = pos[..., None].float() * self.inv_freq
        cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].to(self.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].to(self.dtype)
        half = dim // 2
        batch = torch.arange(rows, device=self.device) if rows_slots is None else rows_slots
        for layer, keys, values in zip(self.layers, keys_cache, values_cache, strict=True):
            qkv = layer.qkv(self._norm(x, layer.norm1))
            rotary = qkv[..., : (heads + kv_heads) * dim].view(rows, length, heads + kv_heads, dim)
            rotary = rotary.transpose(1, 2)  # q and k rotated together
            rotary = rotary * cos + torch.cat([-rotary[..., half:], rotary[..., :half]], -1) * sin
            q, k = rotary.split([heads, kv_heads], 1)
            v = qkv[..., (heads + kv_heads) * dim :].view(rows, length, kv_heads, dim)
            v = v.transpose(1, 2)
            if slot is not None:  # a prompt: causal attention within it
                torch._check(length <= keys.shape[3])
                keys[slot, :, :, :length] = k[0].transpose(1, 2).to(keys.dtype)
                values[slot, :, :length] = v[0].to(values.dtype)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                keys[batch, :, :, pos[:, 0]] = k[:, :, 0].to(keys.dtype)
                values[batch, :, pos[:, 0]] = v[:, :, 0].to(values.dtype)
                if hf_attend.attends(q, keys):  # C++: each row up to its own length
                    out = hf_attend.attend(q, keys, values, batch, pos[:, 0] + 1)
                else:
                    assert mask is not None
                    width = mask.shape[-1]
                    torch._check(width <= keys.shape[3])
                    out = _attend(q, keys[:rows, ..., :width], values[:rows, :, :width], mask)
            x = x + layer.o(out.transpose(1, 2).reshape(rows, length, heads * dim))
            gate, up = layer.gate_up(self._norm(x, layer.norm2)).split(self.inner, -1)
            x = x + layer.down(F.silu(gate) * up)
        last = self._norm(x[:, -1] if ends is None else x[ends, -1], self.norm)
        return self.head(last).float()

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        wide = x.float()  # as transformers does: the statistics in float32 on any device
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * weight


def _attend(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """One token a row against its cached keys (positions last) and values. Eagerly one SDPA
    call; compiled, plain sums that inductor fuses into loops reading the float16 cache once
    (SDPA's CPU kernel made two matrix-vector calls per head and row: most of an eight-row
    step). Keys are kept with positions last so that a score's sum over the head's channels
    runs across vectors of positions, not within one vector per position."""
    rows, kv_heads, dim, width = keys.shape
    if not torch.compiler.is_compiling():
        keys = keys.transpose(2, 3).to(q.dtype, memory_format=torch.contiguous_format)
        return F.scaled_dot_product_attention(
            q, keys, values.to(q.dtype), attn_mask=mask, enable_gqa=True
        )
    group = q.shape[1] // kv_heads
    grouped = q.view(rows, kv_heads, group, dim, 1).float()
    scores = (grouped * keys[:, :, None].float()).sum(-2) * dim**-0.5
    scores = scores.masked_fill(~mask.view(rows, 1, 1, width), float("-inf"))
    weights = (scores - scores.amax(-1, keepdim=True)).exp()  # a softmax, divided at the end:
    out = (weights[..., None] * values[:, :, None].float()).sum(-2)  # once an output channel
    out = out / weights.sum(-1, keepdim=True)  # rather than once a position and channel
    return out.view(rows, kv_heads * group, 1, dim).to(q.dtype)
