"""Int8 linears: int8 weights per output channel, each input row quantised on its own.

A row is scaled by its own absolute maximum onto the kernel's integer range and rounded; the
kernel multiplies in int32, exactly, and the result is scaled back. Integer products have no
rounding order, so a row's result is the same alone or in any batch, eager or compiled.

Two kernels, chosen by the CPU (`best_kernel()`); the layers' matmuls of SmolLM2-135M, one
row and eight, measured on a 2-core AMD EPYC (Zen 3, AVX2, no VNNI):
- `int_mm`: `torch._int_mm` (oneDNN), where the CPU multiplies bytes in one instruction
  (VNNI or AMX). Rows quantised to ±127. Without VNNI oneDNN runs a generic loop: 39 ms
  and 324 ms.
- `fbgemm`: fbgemm's int8 GEMM on weights packed once at load, everywhere else: 10 ms and
  17 ms. Rows are quantised to ±63 there, and the packed copy is the only one
  (`hf_fbgemm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from . import hf_fbgemm

Tensor = torch.Tensor
KERNELS = ("int_mm", "fbgemm") if hf_fbgemm.AVAILABLE else ("int_mm",)  # this torch's
ROW_LEVELS = {"int_mm": 127, "fbgemm": hf_fbgemm.ROW_LEVELS}  # a row's integer range: ±levels


def best_kernel() -> str:
    """`int_mm` where the CPU has VNNI or AMX (or fbgemm is missing), else `fbgemm`."""
    fast_bytes = torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()
    return "int_mm" if fast_bytes or not hf_fbgemm.AVAILABLE else "fbgemm"


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
        if kernel == "fbgemm":  # fbgemm keeps its own copy: `values` becomes its handle
            self.values = hf_fbgemm.PACKS.add(values, self.scales)
        else:
            self.values = values.contiguous()

    def quantized(self) -> tuple[Tensor, Tensor]:
        """The int8 values and per-channel scales, as `kept` takes them back."""
        if self.kernel == "fbgemm":
            return hf_fbgemm.PACKS.unpack(self.values), self.scales
        return self.values, self.scales

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])  # 2-D before quantising: inductor (torch 2.13)
        # miscomputes `_int_mm` on an int8 tensor reshaped after its rounding
        scale = flat.abs().amax(-1, keepdim=True).clamp(min=1e-30) / ROW_LEVELS[self.kernel]
        rounded = (flat / scale).round()
        if self.kernel == "fbgemm":
            out = hf_fbgemm.multiply(rounded, self.values) * scale
        else:
            product = torch._int_mm(rounded.to(torch.int8), self.values.t())
            out = product.float() * (scale * self.scales)
        out = out.view(*x.shape[:-1], self.rows)
        return out if self.bias is None else out + self.bias
