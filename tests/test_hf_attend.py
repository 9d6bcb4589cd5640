"""The decode step's C++ attention (hf_attend): as SDPA (float64) at the head sizes and
groupings of real models, a row's output bit for bit the same whatever its neighbours,
its slot and the cache's length, and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from proxy.providers import hf_attend, hf_compile, hf_vnni

pytestmark = pytest.mark.skipif(
    not hf_vnni.AVAILABLE or hf_compile.compiler() is None,
    reason="built with the vnni kernel's library: AVX-512 VNNI and a C++ compiler",
)
CASES = [  # rows, query heads, key/value heads, head size, cache length
    (8, 9, 3, 64, 256),  # SmolLM2-135M
    (3, 4, 4, 32, 64),  # no grouping
    (2, 14, 2, 64, 256),  # Qwen2-0.5B's grouping
    (2, 8, 2, 80, 100),  # a head size and a cache length that are not powers of two
]


def _cache(slots: int, kv: int, dim: int, capacity: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(slots, kv, dim, capacity, generator=generator).half()
    values = torch.randn(slots, kv, capacity, dim, generator=generator).half()
    return keys, values


@pytest.fixture(scope="module", autouse=True)
def _loaded() -> None:
    assert hf_attend.LIBRARY.prepare(wait=True), hf_attend.LIBRARY.failed


@pytest.mark.parametrize(("rows", "heads", "kv", "dim", "capacity"), CASES)
def test_it_answers_as_sdpa(rows: int, heads: int, kv: int, dim: int, capacity: int) -> None:
    keys, values = _cache(rows + 2, kv, dim, capacity, seed=dim)
    q = torch.randn(rows, heads, 1, dim, generator=torch.Generator().manual_seed(1))
    slots = torch.randperm(rows + 2, generator=torch.Generator().manual_seed(2))[:rows]
    lengths = torch.tensor([max(1, capacity - 7 * i) for i in range(rows)])
    lengths[-1] = 1
    ours = hf_attend.attend(q, keys, values, slots, lengths)
    for row in range(rows):
        slot, length = int(slots[row]), int(lengths[row])
        k = keys[slot, :, :, :length].transpose(1, 2).double()
        theirs = F.scaled_dot_product_attention(
            q[row].double(), k, values[slot, :, :length].double(), enable_gqa=True
        )
        torch.testing.assert_close(ours[row].double(), theirs, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("rows", "heads", "kv", "dim", "capacity"), CASES)
def test_a_row_does_not_depend_on_its_neighbours_its_slot_or_the_cache_length(
    rows: int, heads: int, kv: int, dim: int, capacity: int
) -> None:
    keys, values = _cache(rows, kv, dim, capacity, seed=2)
    q = torch.randn(rows, heads, 1, dim, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([min(5 + 9 * i, capacity) for i in range(rows)])
    together = hf_attend.attend(q, keys, values, torch.arange(rows), lengths)
    for row in range(rows):
        length = int(lengths[row])
        # the same row alone, in another slot of a cache that is just long enough
        k, v = _cache(2, kv, dim, length, seed=9)
        k[1], v[1] = keys[row, ..., :length], values[row, :, :length]
        alone = hf_attend.attend(q[row : row + 1], k, v, torch.tensor([1]), lengths[row : row + 1])
        assert torch.equal(alone, together[row : row + 1]), row


def test_it_refuses_what_it_cannot_take() -> None:
    keys, values = _cache(2, 3, 64, 64, seed=4)
    q = torch.randn(2, 9, 1, 64)
    for slots, lengths in (([0, 2], [3, 3]), ([0, 1], [3, 65]), ([0, 1], [0, 3])):
        with pytest.raises(RuntimeError, match="out of the cache"):
            hf_attend.attend(q, keys, values, torch.tensor(slots), torch.tensor(lengths))
    with pytest.raises(RuntimeError, match="shapes"):
        hf_attend.attend(q[..., :48], keys, values, torch.tensor([0, 1]), torch.tensor([3, 3]))
    assert not hf_attend.attends(q, keys.float())  # a float32 cache: inductor's loops
    assert not hf_attend.attends(q.double(), keys)
    assert hf_attend.attends(q, keys)
