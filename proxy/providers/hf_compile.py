"""The fast decoder's decode step compiled ahead of time (AOT Inductor) in a child process.

Eagerly, a decode step of SmolLM2-135M is about 2,000 small ATen calls, and dispatching
them costs more than the int8 matmuls. `torch.export` + AOT Inductor turn the step into one
C++ library: everything between the matmuls fused, no Python per op. Three packages per
model: a step of one row, a step of 2 to `slots` rows, and a prompt (2 tokens or more) into
a slot, so a request joining a batch stalls it for milliseconds, not an eager prompt's
tens; the cache length, the attention width and the prompt length are symbolic. The
weights are inputs, not baked in, so a library is a few MB and nothing is copied. With
the fbgemm int8 kernel (x86, `hf_int8.best_kernel`) the child also builds `hf_fbgemm`'s C++
operators, kept beside the packages (`fbgemm.so`) and loaded with them; the vnni kernel's
library (`hf_vnni`) is kept in the cache on its own and loaded before the packages.

Compiling takes a minute or two of CPU per package. It runs in a child process, started
once the model has been quiet for `hf_worker.QUIET_S`: the gateway neither stalls nor grows
(compiling in-process cost 200-300 MB of RSS for good). Until the packages are in, and for any step
they do not cover, the step runs eagerly, so no request ever waits for a compile. The
packages are kept under `hf_cache.cache_root()/compiled/<key>` (the key covers the model,
its settings, torch's version and this code), so a restart loads them at once (~10 ms);
other keys' packages unused for `hf_cache.UNUSED_DAYS` are removed then. A
compile that fails is remembered beside them (`<key>.failed`, its reason inside), so a
restart does not spend the minutes again; delete that file to try again.

The int8 matmuls are exact either way; the fused float kernels round differently, and a
model with massive activations (SmolLM2) quantises some of them to a neighbouring int8
value, so compiled and eager logits can differ visibly. Rows stay batch invariant within
the compiled step (tested, beside a row whose length widens the attention window).

`compile` (the provider setting): `auto` compiles on the CPU when a C++ compiler is found,
unless `$OMNIMIND_COMPILE` is `off` (for a whole process: CI, tests); `on` compiles whatever
that says, and logs why it could not; `off` never compiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import hf_attend, hf_cache, hf_fbgemm, hf_native, hf_vnni
from .hf_fast import FastDecoder
from .hf_int8 import ROW_LEVELS, Int8, prepare
from .hf_weights import ModelKey, load_model, log
from .hf_worker import wait_quiet

compiler = hf_native.compiler  # the C++ compiler inductor would build with

COMPILE_THREAD = "omnimind-hf-compile"
PACKAGES = ("one.pt2", "many.pt2", "prompt.pt2", "tokens.pt2")  # a step of one row; of 2
# to `slots`; a prompt; prompts as rows of tokens (`FastDecoder.prefill_many`)


def packages_for(runner: FastDecoder) -> list[str]:
    """The packages a runner's folder holds: prompts as one package or the other."""
    prompts = "tokens.pt2" if runner.tokens_together() else "prompt.pt2"
    return [n for n in PACKAGES[:2] if n == "one.pt2" or runner.slots > 1] + [prompts]


@dataclass(frozen=True, slots=True)
class Recipe:
    """How the child process loads the same model (load_model's arguments)."""

    model: str
    gguf_file: str | None
    dtype: str
    quantize: str
    slots: int


def why_not(runner: Any, mode: str) -> str | None:
    """Why this runner's decode step is not compiled (None: it is)."""
    if mode == "off":
        return "compile: off"
    if mode == "auto" and os.environ.get("OMNIMIND_COMPILE", "").lower() == "off":
        return "OMNIMIND_COMPILE=off"
    if not isinstance(runner, FastDecoder):
        return "only the fast decoder's step compiles"
    if runner.device != "cpu":
        return f"compiling is measured on the CPU only, not on {runner.device}"
    if compiler() is None:
        return f"no C++ compiler ({os.environ.get('CXX') or 'c++'}) on PATH"
    return None


def folder_for(runner: FastDecoder, recipe: Recipe) -> Path:
    modules = (__name__, FastDecoder.__module__, Int8.__module__, hf_fbgemm.__name__,
               hf_vnni.__name__, hf_attend.__name__)  # fmt: skip
    code = b"".join(Path(sys.modules[m].__file__ or "").read_bytes() for m in modules)
    shapes = {k: tuple(v.shape) for k, v in runner.tensors().items()}
    digest = hashlib.sha256(code).hexdigest()
    kernel = [runner.kernel, ROW_LEVELS.get(runner.kernel or "")]  # levels: by the CPU
    # (not whether the C++ attention is loaded yet: a first start builds it in the background,
    # and the child that compiles waits for it, so the next start finds the same packages)
    key = json.dumps([asdict(recipe), torch.__version__, str(shapes), digest, kernel])
    return hf_cache.cache_root() / "compiled" / hashlib.sha256(key.encode()).hexdigest()[:32]


def failure_note(folder: Path) -> Path:
    """Where a failed compile of `folder`'s packages is remembered (its reason inside); a
    new key (model, settings, torch, this code) compiles again, or deleting the note."""
    return folder.with_name(folder.name + ".failed")


def start(
    runner: Any, recipe: Recipe, mode: str, busy: Callable[[], bool], stopped: Callable[[], bool]
) -> None:
    """Swap in the kept packages at once, or compile them in a child process once `busy()`
    has been False for `hf_worker.QUIET_S` (unless `stopped()` first); returns at once."""
    reason = why_not(runner, mode)
    if reason is not None:
        if mode == "on":
            log.warning("decode step not compiled: %s", reason)
        if isinstance(runner, FastDecoder):
            runner.compile_status = f"off ({reason})"
        return
    folder = folder_for(runner, recipe)
    if _swap_in(runner, folder):
        log.info("decode step: compiled packages from %s", folder)
        hf_cache.prune(folder)  # other keys' packages, unused for a month
        return
    if (failed := failure_note(folder)).is_file():  # not minutes of CPU at every start
        why = failed.read_text(encoding="utf-8", errors="replace").strip()[:300]
        runner.compile_status = f"failed ({why}; delete {failed} to try again)"
        log.warning("decode step not compiled: it failed before (%s); delete %s to try again",
                    why, failed)  # fmt: skip
        return
    runner.compile_status = "waiting"  # for the model to be quiet
    thread = threading.Thread(
        target=_compile, args=(runner, recipe, folder, busy, stopped), name=COMPILE_THREAD,
        daemon=True,  # it only waits on the child, which ends itself when this process does
    )  # fmt: skip
    thread.start()


def _swap_in(runner: FastDecoder, folder: Path) -> bool:
    if not (folder / PACKAGES[0]).is_file():
        return False
    try:
        runner.compiled = CompiledStep(runner, folder)
    except (RuntimeError, OSError) as exc:  # damaged, or from another build: compile anew
        log.warning("cannot load the compiled decode step in %s (%s)", folder, exc)
        return False
    runner.compile_status = "ready"
    return True


def _compile(
    runner: FastDecoder,
    recipe: Recipe,
    folder: Path,
    busy: Callable[[], bool],
    stopped: Callable[[], bool],
) -> None:
    if not wait_quiet(busy, stopped):
        runner.compile_status = "off (closed)"
        return
    runner.compile_status = "compiling"
    started = time.perf_counter()
    log.info("compiling the decode step in a child process (minutes the first time)")
    argv = [sys.executable, "-m", __name__, json.dumps(asdict(recipe)), str(folder)]
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors)
        while child.poll() is None:
            if stopped():
                child.kill()
                child.wait()
                runner.compile_status = "off (closed)"
                return
            time.sleep(0.2)
        errors.seek(0)
        said = errors.read()[-4000:].decode(errors="replace").strip().splitlines()
    if child.returncode != 0 or not _swap_in(runner, folder):
        why = said[-1][:300] if said else f"exit status {child.returncode}"
        log.warning("cannot compile the decode step (%s): decoding eagerly", why)
        runner.compile_status = f"failed ({why})"
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)  # the child may not have got so far
            failure_note(folder).write_text(why + "\n", encoding="utf-8")
        except OSError as exc:
            log.warning("cannot note the failed compile (%s): the next start compiles again", exc)
        return
    log.info("decode step compiled in %.1f s", time.perf_counter() - started)
    hf_cache.prune(folder)


class CompiledStep:
    """`FastDecoder.forward` from the packages: one token a row (one row, or 2 to `slots`), or
    a prompt into a slot; eager for a shape they do not cover."""

    def __init__(self, runner: FastDecoder, folder: Path) -> None:
        if (folder / hf_fbgemm.NATIVE).is_file():  # the operators the packages call
            hf_fbgemm.load_native(folder / hf_fbgemm.NATIVE)
        prepare(runner.kernel, wait=True)  # the packages call its library (kept: loads at once)
        loader = torch._C._aoti.AOTIModelPackageLoader
        paths = [folder / name for name in PACKAGES]
        self._one, self._many, self._prompt, self._tokens = (
            loader(str(p), "model", False, 1, -1) if p.is_file() else None for p in paths
        )
        self._weights = list(runner.tensors().values())
        self.eager_steps = 0  # calls the packages did not cover

    def __call__(self, runner: FastDecoder, *args: Any) -> torch.Tensor:
        ids, pos, slot, mask, keys, values, *together = args
        if together:  # prompts as rows of tokens: their slots, and the rows that end them
            package = self._tokens if ids.shape[0] > 1 else None
            inputs = [ids, pos, *together]
        elif slot is not None:
            package = self._prompt if ids.shape[1] > 1 else None
            inputs = [ids, pos, torch.tensor([slot])]
        else:
            package = self._one if ids.shape[0] == 1 else self._many
            inputs = [ids, pos, mask]
        if package is not None:
            try:
                out: torch.Tensor = package.run([*inputs, *keys, *values, *self._weights])[0]
                return out
            except RuntimeError as exc:  # a shape outside its bounds: the step runs eagerly
                log.debug("compiled step refused the shapes (%s)", exc)
        self.eager_steps += 1
        return FastDecoder.forward(runner, *args)


class _Step(torch.nn.Module):
    """What `torch.export` traces: `FastDecoder.forward` with the weights as inputs (`mask`:
    one token a row under it; `slot`: a prompt into that slot)."""

    def __init__(self, runner: FastDecoder, name: str) -> None:
        super().__init__()
        self.runner, self.paths, self.name = runner, list(runner.tensors()), name

    def forward(self, ids: Any, pos: Any, extra: Any, keys: Any, values: Any, weights: Any) -> Any:
        twin = self.runner.with_tensors(dict(zip(self.paths, weights, strict=True)))
        if self.name == "tokens.pt2":  # extra: each row's slot, the rows that end prompts
            return FastDecoder.forward(twin, ids, pos, None, None, keys, values, *extra)
        slot, mask = (extra, None) if self.name == "prompt.pt2" else (None, extra)
        return FastDecoder.forward(twin, ids, pos, slot, mask, keys, values)


def _example(runner: FastDecoder, name: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of a realistic size (inductor sizes its loops by them) and which sizes vary."""
    capacity = 256  # any cache length: it is symbolic
    keys = [
        torch.zeros((runner.slots, runner.kv_heads, runner.head_dim, capacity),
                    dtype=runner.cache_dtype) for _ in runner.layers
    ]  # fmt: skip
    values = [torch.zeros_like(k).transpose(2, 3).contiguous() for k in keys]
    length = torch.export.Dim("length", min=3, max=1 << 20)
    cache = {"keys": [{3: length}] * len(keys), "values": [{2: length}] * len(keys),
             "weights": [None] * len(runner.tensors())}  # fmt: skip
    if name == "tokens.pt2":  # prompts of 30 tokens, in slots 0 and 1 (one with one slot)
        count = min(2, runner.slots)
        tokens = torch.export.Dim("tokens", min=2, max=1 << 16)
        prompts = torch.export.Dim("prompts", min=1, max=runner.slots) if count > 1 else None
        ids, pos = torch.zeros((30 * count, 1), dtype=torch.long), torch.arange(30).repeat(count)
        extra: Any = (torch.arange(30 * count) // 30, torch.tensor([29, 59][:count]))
        dynamic = {"ids": {0: tokens}, "pos": {0: tokens},
                   "extra": ({0: tokens}, {0: prompts} if prompts else None), **cache}  # fmt: skip
        pos = pos[:, None]
    elif name == "prompt.pt2":
        prompt = torch.export.Dim("prompt", min=2, max=(1 << 20) - 1)
        ids, pos = torch.zeros((1, 30), dtype=torch.long), torch.arange(30)[None]
        extra = torch.tensor([0])
        dynamic = {"ids": {1: prompt}, "pos": {1: prompt}, "extra": None, **cache}
    else:
        rows = 1 if name == "one.pt2" else runner.slots
        ids, pos = torch.zeros((rows, 1), dtype=torch.long), torch.arange(rows)[:, None] + 60
        extra = (torch.arange(96)[None, :] <= pos)[:, None, None]  # the mask: width 96
        many = torch.export.Dim("rows", min=2, max=runner.slots) if rows > 2 else None
        by_row = {0: many} if many is not None else None
        width = torch.export.Dim("width", min=2, max=(1 << 20) - 1)
        dynamic = {"ids": by_row, "pos": by_row, "extra": {**(by_row or {}), 3: width}, **cache}
    return (ids, pos, extra, keys, values, list(runner.tensors().values())), dynamic


def build(runner: FastDecoder, folder: Path) -> None:
    """Export and compile the packages into `folder` (written whole, then renamed in)."""
    scratch = Path(tempfile.mkdtemp(prefix=".compiling-", dir=folder.parent))
    try:
        if runner.kernel == "fbgemm":  # the steps call fbgemm from C++, not through Python
            native = scratch / hf_fbgemm.NATIVE
            try:
                hf_fbgemm.build_native(compiler() or "c++", native)
                hf_fbgemm.load_native(native)
            except (RuntimeError, OSError) as exc:  # the steps go through Python instead
                log.warning("%s; the compiled steps call fbgemm through Python", exc)
                native.unlink(missing_ok=True)
        prepare(runner.kernel, wait=True)  # the steps call its library, else its Python path
        for name in packages_for(runner):
            example, dynamic = _example(runner, name)
            program = torch.export.export(_Step(runner, name), example, dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(program, package_path=str(scratch / name))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _main(recipe_json: str, folder: str) -> int:
    """The child: load the model as the gateway did, build its packages; end with the parent."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)  # the gateway is gone: nobody waits for these packages

    threading.Thread(target=watch, daemon=True).start()
    recipe = Recipe(**json.loads(recipe_json))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(hf_cache.cache_root() / "inductor"))
    key = ModelKey(recipe.model, recipe.gguf_file)
    loaded = load_model(key, "cpu", recipe.dtype, None, recipe.quantize, recipe.slots)
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    build(loaded.runner, target)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(*sys.argv[1:3]))
