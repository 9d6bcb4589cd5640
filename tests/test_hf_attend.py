"""The decode step's C++ attention (hf_attend): as SDPA (float64) at the head sizes and
groupings of real models, a row's output bit for bit the same whatever its neighbours and
the width, and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from proxy.providers import hf_attend, hf_compile, hf_vnni

pytestmark = pytest.mark.skipif(
    not hf_vnni.AVAILABLE or hf_compile.compiler() is None,
    reason="built with the vnni kernel's library: AVX-512 VNNI and a C++ compiler",
)
CASES = [  # rows, query heads, key/value heads, head size, cache length, width
    (8, 9, 3, 64, 256, 128),  # SmolLM2-135M
    (3, 4, 4, 32, 64, 64),  # no grouping
    (2, 14, 2, 64, 256, 96),  # Qwen2-0.5B's grouping
    (2, 8, 2, 80, 128, 32),  # a head size that is not a power of two
]


def _cache(rows: int, kv: int, dim: int, capacity: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows + 1, kv, dim, capacity, generator=generator).half()
    values = torch.randn(rows + 1, kv, capacity, dim, generator=generator).half()
    return keys, values


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    positions = torch.tensor(lengths)[:, None] - 1
    return (torch.arange(width)[None, :] <= positions)[:, None, None]


@pytest.fixture(scope="module", autouse=True)
def _loaded() -> None:
    assert hf_attend.LIBRARY.prepare(wait=True), hf_attend.LIBRARY.failed


@pytest.mark.parametrize(("rows", "heads", "kv", "dim", "capacity", "width"), CASES)
def test_it_answers_as_sdpa(
    rows: int, heads: int, kv: int, dim: int, capacity: int, width: int
) -> None:
    keys, values = _cache(rows, kv, dim, capacity, seed=dim)
    q = torch.randn(rows, heads, 1, dim, generator=torch.Generator().manual_seed(1))
    lengths = [width - 7 * i if width - 7 * i > 0 else 1 for i in range(rows)]
    mask = _mask(lengths, width)
    k, v = keys[:rows, ..., :width], values[:rows, :, :width]
    ours = hf_attend.attend(q, k, v, mask)
    theirs = F.scaled_dot_product_attention(
        q.double(), k.transpose(2, 3).double(), v.double(), attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(ours.double(), theirs, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(("rows", "heads", "kv", "dim", "capacity", "width"), CASES)
def test_a_row_does_not_depend_on_its_neighbours_or_the_width(
    rows: int, heads: int, kv: int, dim: int, capacity: int, width: int
) -> None:
    keys, values = _cache(rows, kv, dim, capacity, seed=2)
    q = torch.randn(rows, heads, 1, dim, generator=torch.Generator().manual_seed(3))
    lengths = [min(5 + 9 * i, width) for i in range(rows)]
    together = hf_attend.attend(q, keys[:rows, ..., :width], values[:rows, :, :width],
                                _mask(lengths, width))  # fmt: skip
    for row in range(rows):
        narrow = -(-lengths[row] // 32) * 32  # the narrowest width it could be decoded at
        alone = hf_attend.attend(
            q[row : row + 1], keys[row : row + 1, ..., :narrow],
            values[row : row + 1, :, :narrow], _mask([lengths[row]], narrow),
        )  # fmt: skip
        assert torch.equal(alone, together[row : row + 1]), row


def test_it_refuses_what_it_cannot_take() -> None:
    keys, values = _cache(2, 3, 64, 64, seed=4)
    q = torch.randn(2, 9, 1, 64)
    holes = _mask([10, 10], 64).clone()
    holes[0, ..., 3] = False
    with pytest.raises(RuntimeError, match="not a prefix"):
        hf_attend.attend(q, keys[:2], values[:2], holes)
    with pytest.raises(RuntimeError, match="shapes"):
        hf_attend.attend(q, keys[:2, ..., :48], values[:2, :, :48], _mask([10, 10], 48))
    assert not hf_attend.attends(q, keys.float())  # a float32 cache: inductor's loops
    assert not hf_attend.attends(q.double(), keys)
    assert hf_attend.attends(q, keys)
