"""Int8 linears: int8 weights per output channel, each input row quantised on its own.

A row is scaled by its own absolute maximum onto the kernel's integer range and rounded; the
kernel multiplies in int32, exactly, and the result is scaled back. Integer products have no
rounding order, so a row's result is the same alone or in any batch, eager or compiled.

Three kernels; the layers' matmuls of SmolLM2-135M at one row and at eight, eagerly:
- `vnni`: `hf_vnni`'s C++ GEMM on CPUs with AVX-512 VNNI (where a C++ compiler builds it),
  which also quantises the rows itself. Intel Xeon with AVX-512 VNNI and AMX: 5.5 and 6.0
  ms against fbgemm's 5.8 and 12.2 in the same harness.
- `fbgemm`: fbgemm's int8 GEMM on weights packed once at load, wherever this torch has it
  (x86 with AVX2 or better). The packed copy is the only one (`hf_fbgemm`); rows keep 8 bits
  where the CPU has AVX-512 VNNI, 7 elsewhere. AMD EPYC Zen 3 (AVX2): 10 and 17 ms. Intel
  Xeon with AVX-512 VNNI and AMX: 8.0 and 12.3 ms; its compiled step 6.3 and 14.6 ms.
- `int_mm`: `torch._int_mm` (oneDNN) everywhere else. Rows quantised to ±127. On that Xeon
  12.7 and 13.6 ms, its compiled step 12.1 and 21.5 ms: oneDNN's one-row GEMV is slow even
  with AMX; on the Zen 3 (no VNNI) a generic loop: 39 and 324 ms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from . import hf_attend, hf_fbgemm, hf_native, hf_vnni

Tensor = torch.Tensor
KERNELS = ("int_mm",) + ("fbgemm",) * hf_fbgemm.AVAILABLE + ("vnni",) * hf_vnni.AVAILABLE
ROW_LEVELS = {"int_mm": 127, "fbgemm": hf_fbgemm.ROW_LEVELS, "vnni": hf_vnni.LEVELS}


def best_kernel() -> str:
    """`vnni` where the CPU has AVX-512 VNNI and a C++ compiler is found, else `fbgemm` where
    this torch and CPU have it, else `int_mm` (the order measured on every CPU)."""
    if hf_vnni.AVAILABLE and hf_native.compiler() is not None:
        return "vnni"
    return "fbgemm" if hf_fbgemm.AVAILABLE else "int_mm"


def prepare(kernel: str | None, wait: bool) -> None:
    """Load (or start building, or with `wait` build) the kernel's C++ library, if it has one."""
    if kernel == "vnni":  # and the decode step's attention, built for the same CPUs
        hf_vnni.LIBRARY.prepare(wait)
        hf_attend.LIBRARY.prepare(wait)


class Dense:
    """`x @ w.T + b` in the compute dtype (packing `none`, and every device but the CPU)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.to(weight.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8:
    """An int8 linear (see the module's docstring).

    `kept`: the int8 values and scales of an earlier quantisation (`quantized()`, saved in
    the converted-weights cache): a restart reads them and has nothing left to compute.
    """

    def __init__(
        self,
        weight: Tensor | None,
        bias: Tensor | None,
        kept: tuple[Tensor, Tensor] | None = None,
        kernel: str = "int_mm",
    ) -> None:
        if kept is not None:
            values, scales = kept
        else:
            assert weight is not None
            wide = weight.float()
            scales = (wide.abs().amax(1) / 127).clamp(min=1e-8)
            values = (wide / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(torch.float32, copy=True)  # not a view: a kept file stays mapped
        self.bias = None if bias is None else bias.float()
        self.rows = int(values.shape[0])
        self.kernel = kernel
        self.columns = int(values.shape[1])
        if kernel == "fbgemm":  # fbgemm keeps its own copy: `values` becomes its handle
            self.values = hf_fbgemm.PACKS.add(values, self.scales)
        elif kernel == "vnni":  # in the kernel's layout, with each column's sum
            self.values, self.colsum = hf_vnni.pack(values)
        else:
            self.values = values.contiguous()

    def quantized(self) -> tuple[Tensor, Tensor]:
        """The int8 values and per-channel scales, as `kept` takes them back."""
        if self.kernel == "fbgemm":
            return hf_fbgemm.PACKS.unpack(self.values), self.scales
        if self.kernel == "vnni":
            return hf_vnni.unpack(self.values, self.rows, self.columns), self.scales
        return self.values, self.scales

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # 2-D before quantising: inductor (torch 2.13)
        # miscomputes `_int_mm` on an int8 tensor reshaped after its rounding
        if self.kernel == "vnni":  # quantises the rows itself, in C++
            out = hf_vnni.linear(flat.float(), self.values, self.colsum, self.scales)
            out = out.view(*x.shape[:-1], self.rows)
            return out if self.bias is None else out + self.bias
        scale = flat.abs().amax(-1, keepdim=True).clamp(min=1e-30) / ROW_LEVELS[self.kernel]
        rounded = (flat / scale).round()
        if self.kernel == "fbgemm":
            out = hf_fbgemm.multiply(rounded, self.values) * scale
        else:
            product = torch._int_mm(rounded.to(torch.int8), self.values.t())
            out = product.float() * (scale * self.scales)
        out = out.view(*x.shape[:-1], self.rows)
        return out if self.bias is None else out + self.bias
