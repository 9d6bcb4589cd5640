"""The C++ decode attention (hf_attend, built by hf_native as the compile child builds it):
the same as SDPA over the row's own positions, a row's output bit for bit the same whatever
sits beside it and however wide the slice, bad shapes refused with a reason."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from proxy.providers import hf_compile, hf_native

pytestmark = pytest.mark.skipif(
    not hf_native.AVAILABLE or hf_compile.compiler() is None,
    reason="the C++ operators: x86 with AVX2 and a C++ compiler",
)
KV_HEADS, GROUP, DIM, CAPACITY = 3, 3, 128, 300  # SmolLM2-135M's heads, a wide head size


Attend = Callable[..., torch.Tensor]


@pytest.fixture(scope="module")
def attend(tmp_path_factory: pytest.TempPathFactory) -> Attend:
    native = tmp_path_factory.mktemp("native") / hf_native.NATIVE
    hf_native.build(hf_compile.compiler() or "c++", native)
    hf_native.load(native)  # a no-op where an earlier test loaded it
    operator: Attend = torch.ops.omnimind_native.attend
    return operator


def _inputs(rows: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, KV_HEADS * GROUP, DIM, generator=generator)
    keys = torch.randn(rows + 2, KV_HEADS, CAPACITY, DIM, generator=generator).to(dtype)
    values = torch.randn(rows + 2, KV_HEADS, CAPACITY, DIM, generator=generator).to(dtype)
    return q, keys, values


@pytest.mark.parametrize("dim", [64, 8, 40, 128])  # SmolLM2, the tiny model, any, wide
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_it_is_attention_over_each_rows_own_positions(
    attend: Attend, dtype: torch.dtype, dim: int
) -> None:
    q, keys, values = (t[..., :dim].contiguous() for t in _inputs(5, dtype))
    lengths = torch.tensor([1, 7, 64, 150, 299])
    out = attend(q, keys[:, :, :299], values[:, :, :299], lengths, dim**-0.5)
    for r, length in enumerate(lengths.tolist()):
        expected = F.scaled_dot_product_attention(
            q[r, :, None].double(), keys[r, :, :length].double(), values[r, :, :length].double(),
            enable_gqa=True,
        )[:, 0]  # fmt: skip
        torch.testing.assert_close(out[r].double(), expected, atol=2e-6, rtol=2e-5)


def test_a_row_does_not_depend_on_its_neighbours_or_the_width(attend: Attend) -> None:
    q, keys, values = _inputs(8, torch.float16)
    lengths = torch.tensor([40, 250, 3, 96, 97, 128, 1, 200])
    together = attend(q, keys[:, :, :256], values[:, :, :256], lengths, DIM**-0.5)
    for r in (0, 2, 6):
        one, length = q[r : r + 1], lengths[r : r + 1]
        alone = attend(one, keys[r:], values[r:], length, DIM**-0.5)
        narrow = attend(one, keys[r:, :, :64], values[r:, :, :64], length, DIM**-0.5)
        assert torch.equal(alone[0], together[r]) and torch.equal(narrow[0], together[r])


def test_bad_shapes_are_refused_with_a_reason(attend: Attend) -> None:
    q, keys, values = _inputs(2, torch.float16)
    with pytest.raises(RuntimeError, match="a length outside the cache"):
        attend(q, keys[:, :, :10], values[:, :, :10], torch.tensor([5, 11]), 1.0)
    with pytest.raises(RuntimeError, match="a length outside the cache"):
        attend(q, keys, values, torch.tensor([0, 3]), 1.0)
    with pytest.raises(RuntimeError, match="one length a row"):
        attend(q, keys, values, torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="float16 or float32"):
        attend(q, keys.bfloat16(), values.bfloat16(), torch.tensor([3, 3]), 1.0)
    with pytest.raises(RuntimeError, match="head size"):
        attend(q[..., :36], keys[..., :36], values[..., :36], torch.tensor([3, 3]), 1.0)


def test_a_library_that_cannot_be_built_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot build native.so"):
        hf_native.build("false", tmp_path / hf_native.NATIVE)
