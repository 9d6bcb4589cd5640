"""fbgemm's int8 GEMM for `hf_int8.Int8`: weights packed once, found by a handle.

Rows are multiplied as unsigned bytes around a zero point. fbgemm's AVX-512 VNNI kernel adds
byte products into 32 bits, so rows keep 8 bits there (±127 around 128); its AVX2 kernel adds
them in pairs into 16 bits, which saturates with 8-bit rows, so rows are quantised to ±63
there (around 64, as PyTorch's `reduce_range`). Both are exact (tested at the extremes).

fbgemm keeps its packed copy of the weights (K in blocks of 512 on AVX2: 1.8× the bytes of
a 576-wide matrix), so the int8 values are not kept beside it: an `Int8`'s `values` is a
handle of one byte a row (the fake operator reads the row count from its shape), and
`PACKS.unpack` gives the values back, exactly, for the cache.

Two operators do the multiplication, both looking the packed weights up by the handle's
address:
- `omnimind::fbgemm_mm`, in Python: always there (a plain `torch.library` operator;
  `custom_op`'s first call imported dynamo, 1.8 s of a restart's first answer);
- `omnimind_native::fbgemm_mm`, the same in C++ (`SOURCE`), built beside the compiled
  packages (`build_native`) and loaded with them (`load_native`). Calling fbgemm from
  Python cost ~30 µs a call in argument conversion, where fbgemm itself takes ~8 µs on a
  small matrix: 4 ms of a one-row SmolLM2 step (121 calls). Once it is loaded, eager calls
  and compiled steps use it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from . import hf_native

Tensor = torch.Tensor
AVAILABLE = "fbgemm" in torch.backends.quantized.supported_engines and (  # x86 builds
    torch.backends.cpu.get_cpu_capability() != "DEFAULT"  # and a CPU with AVX2 at least
)
NATIVE = "fbgemm.so"  # the C++ operators' file name, beside the compiled packages
ROW_LEVELS = 127 if torch.cpu._is_vnni_supported() else 63  # a row's range: ±ROW_LEVELS,
ZERO_POINT = ROW_LEVELS + 1  # shifted by it into unsigned bytes
SOURCE = r"""
#include <torch/library.h>
#include <ATen/native/quantized/PackedParams.h>
#include <mutex>
#include <unordered_map>

namespace {
std::mutex lock;
std::unordered_map<const void*, c10::intrusive_ptr<LinearPackedParamsBase>> packs;

void keep(const at::Tensor& handle, c10::intrusive_ptr<LinearPackedParamsBase> packed) {
  std::lock_guard<std::mutex> held(lock);
  packs[handle.data_ptr()] = std::move(packed);
}

void drop(const at::Tensor& handle) {
  std::lock_guard<std::mutex> held(lock);
  packs.erase(handle.data_ptr());
}

at::Tensor fbgemm_mm(const at::Tensor& rows, const at::Tensor& handle, int64_t zero_point) {
  c10::intrusive_ptr<LinearPackedParamsBase> packed;
  {
    std::lock_guard<std::mutex> held(lock);
    auto found = packs.find(handle.data_ptr());
    TORCH_CHECK(found != packs.end(), "omnimind_native::fbgemm_mm: no weights for this handle");
    packed = found->second;
  }
  return packed->apply_with_input_q_dq_qweight_dq_output_fp32(rows, 1.0, zero_point);
}
}  // namespace

TORCH_LIBRARY(omnimind_native, m) {
  m.def("keep(Tensor handle, "
        "__torch__.torch.classes.quantized.LinearPackedParamsBase packed) -> ()", keep);
  m.def("drop(Tensor handle) -> ()", drop);
  m.def("fbgemm_mm(Tensor rows, Tensor handle, int zero_point) -> Tensor");
  m.impl("fbgemm_mm", c10::DispatchKey::CPU, fbgemm_mm);
}
"""


class Packs:
    """fbgemm's packed weights by the address of their handle, dropped with the handle;
    shared with the C++ operators once they are loaded."""

    def __init__(self) -> None:
        self._by_address: dict[int, tuple[Tensor, Any]] = {}
        self._lock = threading.Lock()
        self.native = False  # omnimind_native is loaded and knows every pack

    def add(self, values: Tensor, scales: Tensor) -> Tensor:
        """Pack `values` (int8, a row per output channel); the handle that finds them."""
        zeros = torch.zeros(len(scales), dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm packs them
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch._make_per_channel_quantized_tensor(
                values.contiguous(), scales.double(), zeros, 0
            )
            packed = torch.ops.quantized.linear_prepack(quantized, None)
        handle = torch.zeros(values.shape[0], 1, dtype=torch.int8)
        address = handle.data_ptr()
        with self._lock:
            self._by_address[address] = (handle.detach(), packed)
            if self.native:
                torch.ops.omnimind_native.keep(handle, packed)
        weakref.finalize(handle, self._drop, address, packed).atexit = False  # not at exit
        return handle

    def _drop(self, address: int, packed: Any) -> None:
        with self._lock:
            entry = self._by_address.get(address)
            if entry is not None and entry[1] is packed:
                del self._by_address[address]
                if self.native:
                    torch.ops.omnimind_native.drop(entry[0])

    def __getitem__(self, handle: Tensor) -> Any:
        return self._by_address[handle.data_ptr()][1]

    def __len__(self) -> int:
        return len(self._by_address)

    def unpack(self, handle: Tensor) -> Tensor:
        """The int8 values back from the packed weights (exactly)."""
        return torch.ops.quantized.linear_unpack(self[handle])[0].int_repr()

    def share(self) -> None:
        """Give every pack to the loaded C++ operators, and every later one."""
        with self._lock:
            for handle, packed in self._by_address.values():
                torch.ops.omnimind_native.keep(handle, packed)
            self.native = True


PACKS = Packs()  # one per process, as the operators that read it


def _fbgemm(rows: Tensor, handle: Tensor, zero_point: int) -> Tensor:
    """`rows @ values.T` times each output channel's scale; `rows` holds whole numbers in
    [-ROW_LEVELS, ROW_LEVELS] (float32)."""
    dequantize = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return dequantize(rows, 1.0, zero_point, PACKS[handle])


_OPERATORS = torch.library.Library("omnimind", "DEF")  # kept for the process, as the packs
_OPERATORS.define("fbgemm_mm(Tensor rows, Tensor handle, int zero_point) -> Tensor")
_OPERATORS.impl("fbgemm_mm", _fbgemm, "CPU")


def _fake(rows: Tensor, handle: Tensor, zero_point: int) -> Tensor:
    return rows.new_empty(rows.shape[0], handle.shape[0])


torch.library.register_fake("omnimind::fbgemm_mm")(_fake)


def multiply(rows: Tensor, handle: Tensor) -> Tensor:
    """The product by the fastest operator loaded (through the dispatcher when compiling)."""
    if PACKS.native:
        return torch.ops.omnimind_native.fbgemm_mm(rows, handle, ZERO_POINT)
    if torch.compiler.is_compiling():
        return torch.ops.omnimind.fbgemm_mm(rows, handle, ZERO_POINT)
    return _fbgemm(rows, handle, ZERO_POINT)


def build_native(compiler: str, target: Path) -> None:
    """Compile `SOURCE` into `target` (a shared library for this torch); raises
    `RuntimeError` with the compiler's last words when it fails."""
    hf_native.build(SOURCE, target, compiler)


def load_native(path: Path) -> None:
    """Load the C++ operators (once a process) and share the packs with them."""
    if PACKS.native:
        return
    torch.ops.load_library(str(path))
    torch.library.register_fake("omnimind_native::fbgemm_mm")(_fake)
    PACKS.share()
