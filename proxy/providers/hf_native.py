"""C++ operators compiled here against this torch: the compiler, the build, a kept library.

`Library` is one shared library built once per torch and source into the cache
(`hf_cache.cache_root()/native/<name>-<digest>.so`, written whole then renamed in, so
starts racing each other each find a complete file), in the background the first time
(seconds of the compiler; callers use their Python path meanwhile), and loaded at once by
every later start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from . import hf_cache
from .hf_cache import log


def compiler() -> str | None:
    """The C++ compiler inductor would build with: `$CXX` (else `c++`), or `g++`."""
    return shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++")


def build(source: str, target: Path, cxx: str, flags: tuple[str, ...] = ()) -> None:
    """Compile `source` into `target` (a shared library for this torch); raises
    `RuntimeError` with the compiler's first error line (else its last words) when it fails."""
    from torch.utils import cpp_extension

    code = target.with_suffix(".cpp")
    code.write_text(source, encoding="utf-8")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    argv = [cxx, "-shared", "-fPIC", "-O2", "-std=c++20", *flags, str(code), "-o", str(target),
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]  # fmt: skip
    argv += [f"-I{p}" for p in cpp_extension.include_paths()]
    argv += [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    done = subprocess.run(  # at a low priority: a first start's answers come first
        argv, capture_output=True, text=True, check=False, preexec_fn=_yield_cpu
    )
    code.unlink(missing_ok=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        errors = [line.strip() for line in said if "error" in line] or said[-1:]
        why = errors[0] if errors else done.returncode
        raise RuntimeError(f"cannot build {target.name}: {why}")


def _yield_cpu() -> None:
    os.nice(10)


class Library:
    """`source` as a library kept in the cache; `on_load` runs once it is loaded."""

    def __init__(
        self, name: str, source: str, flags: tuple[str, ...], on_load: Callable[[], None]
    ) -> None:
        self.name, self.source, self.flags, self.on_load = name, source, flags, on_load
        self.loaded = False
        self.failed: str | None = None  # why it could not be built (this process tries once)
        self._lock = threading.Lock()
        self._builder: threading.Thread | None = None

    def path(self) -> Path:
        key = "\0".join([self.source, " ".join(self.flags), torch.__version__])
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return hf_cache.cache_root() / "native" / f"{self.name}-{digest}.so"

    def prepare(self, wait: bool) -> bool:
        """Load the kept library, or build it (in the background unless `wait`); whether it
        is loaded now."""
        with self._lock:
            if self.loaded or self.failed:
                return self.loaded
            if self.path().is_file():
                self._load(self.path())
                if self.loaded:  # marked used: another build's pruning keeps it
                    hf_cache.prune(self.path())
                return self.loaded
            if self._builder is None:
                self._builder = threading.Thread(
                    target=self._build, name=f"omnimind-build-{self.name}", daemon=True
                )
                self._builder.start()
            builder = self._builder
        if wait:
            builder.join()
        return self.loaded

    def _build(self, cxx: str | None = None) -> None:
        target = self.path()
        try:
            cxx = cxx or compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler on PATH")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".building-", dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                build(self.source, built, cxx, self.flags)
                os.replace(built, target)
        except (RuntimeError, OSError) as exc:
            log.warning("cannot build %s (%s): its Python path stays", self.name, exc)
            with self._lock:
                self.failed = str(exc)[:300]
            return
        with self._lock:
            self._load(target)
        hf_cache.prune(target)  # other torch versions' and sources' builds, unused for a month

    def _load(self, path: Path) -> None:
        try:
            torch.ops.load_library(str(path))
        except OSError as exc:  # damaged: build anew next start
            log.warning("cannot load %s (%s)", path, exc)
            self.failed = str(exc)[:300]
            path.unlink(missing_ok=True)
            return
        self.on_load()
        self.loaded = True
