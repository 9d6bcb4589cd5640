"""The int8 linears (hf_int8), for every kernel: close to the float product, rows batch
invariant bit for bit, kernels agreeing, fbgemm's packed weights dropped with their handles.
`int_mm` and fbgemm run on any x86 CPU (fbgemm is x86 only), vnni on CPUs with AVX-512
VNNI, so each is checked wherever the suite runs, whichever the CPU picks (test_hf_vnni
has vnni's own)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from proxy.providers import hf_compile, hf_fbgemm, hf_int8, hf_vnni
from proxy.providers.hf_int8 import KERNELS, Int8

SHAPES = [(96, 64), (300, 200), (49, 576)]  # odd sizes too: no kernel may assume blocks
RESOLUTION = {"int_mm": 0.02, "fbgemm": 0.04, "vnni": 0.02}  # relative: rows at 8 bits, at 7
# (fbgemm's rows keep 8 bits where the CPU has AVX-512 VNNI: its bound holds there too)


def _linear(rows: int, columns: int, kernel: str, bias: bool = False) -> tuple[Int8, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows * columns)
    weight = torch.randn(rows, columns, generator=generator) * 0.05
    b = torch.randn(rows, generator=generator) if bias else None
    return Int8(weight, b, kernel=kernel), weight


def _inputs(count: int, columns: int) -> torch.Tensor:
    x = torch.randn(count, columns, generator=torch.Generator().manual_seed(count))
    x[:, 3] *= 8  # an outlier channel, as real activations have
    return x


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_close_to_the_float_product(kernel: str, rows: int, columns: int) -> None:
    linear, weight = _linear(rows, columns, kernel, bias=True)
    x = _inputs(9, columns)
    assert linear.bias is not None
    exact = x @ weight.T + linear.bias
    error = (linear(x) - exact).norm() / (x @ weight.T).norm()
    assert error < RESOLUTION[kernel], error


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_is_the_same_alone_and_in_any_batch(kernel: str) -> None:
    linear, _ = _linear(300, 200, kernel)
    x = _inputs(40, 200)  # up to a prompt's worth of rows
    together = linear(x)
    for count in (1, 2, 3, 8, 9, 40):
        assert torch.equal(linear(x[:count]), together[:count]), count
    assert torch.equal(linear(x[None, 5:7])[0], together[5:7])  # any leading shape


needs_fbgemm = pytest.mark.skipif(not hf_fbgemm.AVAILABLE, reason="fbgemm: x86 builds only")


@needs_fbgemm
def test_the_kernels_agree_within_their_resolution() -> None:
    (a, weight), *others = (_linear(300, 200, kernel) for kernel in KERNELS)
    x = _inputs(8, 200)
    exact = x @ weight.T
    for b, _ in others:
        assert ((a(x) - b(x)).norm() / exact.norm()) < RESOLUTION[b.kernel] + 0.02


@needs_fbgemm
def test_fbgemm_gives_its_values_back_exactly_for_the_cache() -> None:
    """fbgemm keeps only its packed copy; `quantized()` unpacks the same int8 values and
    scales that `int_mm` keeps, and a linear built from them answers bit for bit."""
    (mm, _), (fb, _) = (_linear(300, 200, kernel) for kernel in ("int_mm", "fbgemm"))
    values, scales = fb.quantized()
    assert torch.equal(values, mm.values) and torch.equal(scales, mm.scales)
    assert fb.values.numel() == 300  # a handle of one byte a row, not a second copy
    again = Int8(None, None, (values, scales), kernel="fbgemm")
    x = _inputs(3, 200)
    assert torch.equal(again(x), fb(x))


@needs_fbgemm
def test_fbgemm_packs_are_dropped_with_their_handles() -> None:
    gc.collect()
    before = len(hf_fbgemm.PACKS)
    linears = [_linear(64, 32, "fbgemm")[0] for _ in range(5)]
    assert len(hf_fbgemm.PACKS) == before + 5
    del linears
    gc.collect()
    assert len(hf_fbgemm.PACKS) == before


def test_the_kernel_is_the_fastest_this_cpu_runs() -> None:
    """vnni where the CPU has AVX-512 VNNI (and a compiler builds it), else fbgemm, else
    int_mm."""
    if hf_vnni.AVAILABLE and hf_compile.compiler() is not None:
        assert hf_int8.best_kernel() == "vnni"
    else:
        assert hf_int8.best_kernel() == ("fbgemm" if hf_fbgemm.AVAILABLE else "int_mm")
    vnni = torch.cpu._is_vnni_supported()  # fbgemm adds byte products in 32 bits there
    assert hf_fbgemm.ROW_LEVELS == (127 if vnni else 63)


@needs_fbgemm
def test_fbgemm_is_exact_at_the_extremes_of_its_rows() -> None:
    """Rows at ±ROW_LEVELS against weights at ±127: no 16-bit pair sum saturates."""
    levels = hf_fbgemm.ROW_LEVELS
    weight = torch.full((64, 576), 127, dtype=torch.int8)
    weight[1::2] = -127
    linear = Int8(None, None, (weight, torch.ones(64)), kernel="fbgemm")
    rows = torch.full((3, 576), float(levels))
    rows[1] = -levels
    rows[2, 1::2] = -levels
    exact = rows.double() @ weight.double().T
    assert torch.equal(hf_fbgemm.multiply(rows, linear.values).double(), exact)


@needs_fbgemm
@pytest.mark.skipif(hf_compile.compiler() is None, reason="no C++ compiler on PATH")
def test_the_native_operator_answers_as_the_python_one(tmp_path: Path) -> None:
    """The C++ operator (built as the compile child builds it) gives the same bits as the
    Python one, for packs made before it was loaded and after."""
    before, _ = _linear(300, 200, "fbgemm")
    x = _inputs(8, 200)
    expected = before(x)
    native = tmp_path / hf_fbgemm.NATIVE
    hf_fbgemm.build_native(hf_compile.compiler() or "c++", native)
    hf_fbgemm.load_native(native)
    hf_fbgemm.load_native(native)  # once a process: a second load is a no-op
    assert hf_fbgemm.PACKS.native
    assert torch.equal(before(x), expected)
    after, _ = _linear(300, 200, "fbgemm")
    assert torch.equal(after(x), expected)
    rows = (x / (x.abs().amax(-1, keepdim=True) / hf_fbgemm.ROW_LEVELS)).round()
    zero = hf_fbgemm.ZERO_POINT
    direct = torch.ops.omnimind_native.fbgemm_mm(rows, after.values, zero)
    assert torch.equal(direct, torch.ops.omnimind.fbgemm_mm(rows, after.values, zero))


def test_a_failed_native_build_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot build fbgemm.so"):
        hf_fbgemm.build_native("false", tmp_path / hf_fbgemm.NATIVE)
