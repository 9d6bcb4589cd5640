"""The gateway's C++ operators (`omnimind_native`), built beside the compiled packages.

Two operators, one library (`native.so`): fbgemm's int8 product on packed weights
(`hf_fbgemm.SOURCE`: calling fbgemm from Python cost ~30 µs a call in argument conversion)
and a decode step's attention (`hf_attend.SOURCE`). The compile child builds the library
with `g++` (~10 s) before it exports the steps, so the packages call the operators by
name, and the gateway loads it with them (`CompiledStep`). It is built for x86 CPUs with
AVX2 (`hf_fbgemm.AVAILABLE`), with AVX-512 where torch's own kernels use it
(`capability()`, part of the packages' key: a library built here may not run elsewhere).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from . import hf_attend, hf_fbgemm

NATIVE = "native.so"
AVAILABLE = hf_fbgemm.AVAILABLE  # x86 with AVX2 at least: the operators' intrinsics


def capability() -> str:
    """The vector width the library is built for: torch's (`AVX2` or `AVX512`)."""
    return torch.backends.cpu.get_cpu_capability()


def loaded() -> bool:
    return hf_fbgemm.PACKS.native


def build(compiler: str, target: Path) -> None:
    """Compile both operators into `target` (a shared library for this torch and CPU);
    raises `RuntimeError` with the compiler's last words when it fails."""
    from torch.utils import cpp_extension

    source = target.with_suffix(".cpp")
    source.write_text(hf_fbgemm.SOURCE + hf_attend.SOURCE, encoding="utf-8")
    vectors = ["-mavx2", "-mfma", "-mf16c"]
    if capability() == "AVX512":
        vectors += ["-mavx512f", "-mavx512dq"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    argv = [compiler, "-shared", "-fPIC", "-O2", "-std=c++20", *vectors, str(source), "-o",
            str(target), f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]  # fmt: skip
    argv += [f"-I{p}" for p in cpp_extension.include_paths()]
    argv += [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    source.unlink(missing_ok=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"cannot build {target.name}: {said[-1] if said else done.returncode}")


def load(path: Path) -> None:
    """Load the operators (once a process) and share fbgemm's packs with them."""
    if loaded():
        return
    torch.ops.load_library(str(path))
    torch.library.register_fake("omnimind_native::fbgemm_mm")(hf_fbgemm.fake)
    torch.library.register_fake("omnimind_native::attend")(hf_attend.fake)
    hf_fbgemm.PACKS.share()
