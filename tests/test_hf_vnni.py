"""The vnni int8 kernel (hf_vnni) and the C++ libraries built here (hf_native): packing
undone exactly, the C++ operator exact and bit for bit the Python path's, at the extremes
and at shapes that fill no block; a library built once into the cache, in the background,
and a build that fails leaving the Python path and saying why."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from proxy.providers import hf_cache, hf_compile, hf_native, hf_vnni
from proxy.providers.hf_int8 import Int8

SHAPES = [(96, 64), (300, 200), (49, 576), (70, 1000), (1000, 12)]  # blocks of 64 and 8: odd
needs_vnni = pytest.mark.skipif(
    not hf_vnni.AVAILABLE or hf_compile.compiler() is None,
    reason="the vnni kernel needs AVX-512 VNNI and a C++ compiler",
)


def _weights(rows: int, columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rows + columns)
    values = torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8)
    values[0] = 127  # the extremes, in both signs
    values[-1] = -127
    return values


def _rows(count: int, columns: int) -> torch.Tensor:
    """Whole numbers in [-127, 127], each row reaching ±127: its scale is exactly 1."""
    generator = torch.Generator().manual_seed(count * columns)
    rows = torch.randint(-127, 128, (count, columns), generator=generator).float()
    rows[:, 0] = 127.0
    rows[1::2, 0] = -127.0
    rows[0] = 127.0  # the extremes, whole rows of them
    rows[-1, 1:] = -127.0
    return rows


def _floats(count: int, columns: int) -> torch.Tensor:
    x = torch.randn(count, columns, generator=torch.Generator().manual_seed(count))
    x[:, 1 % columns] *= 8  # an outlier channel, as real activations have
    return x


@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_packing_gives_the_values_back_exactly(rows: int, columns: int) -> None:
    values = _weights(rows, columns)
    packed, colsum = hf_vnni.pack(values)
    assert packed.shape[0] * hf_vnni.COLUMNS >= rows and packed.shape[1] * 4 % hf_vnni.DEPTH == 0
    assert torch.equal(hf_vnni.unpack(packed, rows, columns), values)
    assert torch.equal(colsum[:rows], values.sum(1, dtype=torch.int32))
    assert not colsum[rows:].any()  # padding adds nothing


@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_the_python_path_is_exact(rows: int, columns: int) -> None:
    values = _weights(rows, columns)
    packed, colsum = hf_vnni.pack(values)
    scales = torch.ones(rows)
    x = _rows(5, columns)
    exact = x.double() @ values.double().T
    assert torch.equal(hf_vnni._python(x, packed, colsum, scales).double(), exact)


@needs_vnni
@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_the_native_operator_is_exact_and_answers_as_the_python_path(
    rows: int, columns: int
) -> None:
    """Every row count a step or a prompt uses (tiles of 1 to 8 rows, and more rows run
    again over the same columns): exact sums at the extremes, and the Python path's bits
    (its quantisation, its scaling back) for any rows."""
    assert hf_vnni.LIBRARY.prepare(wait=True), hf_vnni.LIBRARY.failed
    values = _weights(rows, columns)
    packed, colsum = hf_vnni.pack(values)
    scales = torch.rand(rows, generator=torch.Generator().manual_seed(1)) + 0.5
    for count in (1, 2, 3, 4, 5, 7, 8, 9, 16, 30):
        x = _rows(count, columns)
        native = torch.ops.omnimind_vnni.linear(x, packed, colsum, scales)
        assert torch.equal(native, (x.double() @ values.double().T).float() * scales), count
        x = _floats(count, columns)
        native = torch.ops.omnimind_vnni.linear(x, packed, colsum, scales)
        assert torch.equal(native, hf_vnni._python(x, packed, colsum, scales)), count


@needs_vnni
def test_a_row_of_nan_or_zeros_answers_as_the_python_path() -> None:
    assert hf_vnni.LIBRARY.prepare(wait=True)
    packed, colsum = hf_vnni.pack(_weights(96, 64))
    x = _floats(3, 64)
    x[0] = 0.0
    x[2, 5] = float("nan")
    native = torch.ops.omnimind_vnni.linear(x, packed, colsum, torch.ones(96))
    python = hf_vnni._python(x, packed, colsum, torch.ones(96))
    assert torch.equal(native[:2], python[:2]) and not native[0].any()
    assert native[2].isnan().all() and python[2].isnan().all()


@needs_vnni
def test_a_linear_answers_alike_before_and_after_the_library_loads() -> None:
    generator = torch.Generator().manual_seed(3)
    linear = Int8(torch.randn(300, 200, generator=generator), None, kernel="vnni")
    x = torch.randn(8, 200, generator=generator)
    by_python = hf_vnni._python(x, linear.values, linear.colsum, linear.scales)
    assert hf_vnni.LIBRARY.prepare(wait=True)
    assert torch.equal(linear(x), by_python)


@needs_vnni
def test_the_operator_refuses_weights_packed_for_another_shape() -> None:
    assert hf_vnni.LIBRARY.prepare(wait=True)
    packed, colsum = hf_vnni.pack(_weights(96, 64))
    with pytest.raises(RuntimeError, match="another shape"):
        torch.ops.omnimind_vnni.linear(_rows(2, 200), packed, colsum, torch.ones(96))


TRIVIAL = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor twice(const at::Tensor& x) { return x * 2; }
TORCH_LIBRARY(omnimind_test_native, m) { m.def("twice(Tensor x) -> Tensor", twice); }
"""


@pytest.mark.skipif(hf_compile.compiler() is None, reason="no C++ compiler on PATH")
def test_a_library_is_built_once_in_the_background_and_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMNIMIND_CACHE_DIR", str(tmp_path))
    loads: list[int] = []
    library = hf_native.Library("trivial", TRIVIAL, (), lambda: loads.append(1))
    assert library.prepare(wait=False) is False  # building: the caller goes on meanwhile
    library.prepare(wait=True)
    assert library.loaded and loads == [1]
    assert library.path().parent == hf_cache.cache_root() / "native"
    assert [p.name for p in library.path().parent.iterdir()] == [library.path().name]
    assert torch.equal(torch.ops.omnimind_test_native.twice(torch.ones(2)), torch.full((2,), 2.0))
    again = hf_native.Library("trivial", TRIVIAL, (), lambda: loads.append(2))
    started = time.monotonic()
    assert again.prepare(wait=False)  # a later start: the kept file, loaded at once
    assert time.monotonic() - started < 5 and loads == [1, 2]


def test_a_failed_build_leaves_the_python_path_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OMNIMIND_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    library = hf_native.Library("broken", "this is not C++", (), lambda: None)
    assert library.prepare(wait=True) is False
    assert library.failed is not None and "cannot build" in library.failed
    assert "cannot build broken" in caplog.text
    assert library.prepare(wait=True) is False  # tried once a process, not at every call
    assert not library.path().exists()
    assert not list((tmp_path / "native").glob(".building-*"))  # no scratch left behind


@needs_vnni
def test_a_row_is_the_same_alone_in_a_step_and_in_a_prompt() -> None:
    """Decode steps (up to 8 rows: VNNI) and prompts (more: AMX where the CPU has it) sum
    the same integers: a row's bits do not depend on which path its batch took."""
    assert hf_vnni.LIBRARY.prepare(wait=True)
    generator = torch.Generator().manual_seed(5)
    linear = Int8(torch.randn(160, 576, generator=generator), None, kernel="vnni")
    x = _floats(40, 576)
    together = linear(x)
    for count in (1, 2, 8, 9, 16, 17, 33):
        assert torch.equal(linear(x[:count]), together[:count]), count
