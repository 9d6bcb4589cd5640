"""The compiled decode step (hf_compile): the same answers as the eager one, rows batch
invariant, every step shape covered by its two packages, compiled in a child process behind
a live gateway and found again by the next start.

Compiling builds C++ with the system compiler: a minute or so for the tiny model.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from proxy.providers import hf_cache, hf_compile, hf_fbgemm
from proxy.providers.hf_fast import FastDecoder, Weights
from proxy.providers.hf_int8 import KERNELS, best_kernel
from proxy.providers.hf_weights import ModelKey, load_model

from .conftest import GatewayFactory
from .servers import UvicornServer

needs_compiler = pytest.mark.skipif(
    hf_compile.compiler() is None,
    reason="AOT Inductor builds C++: no compiler on PATH (the gateway then decodes eagerly)",
)
PROMPTS = ["Tell me about cats.", "Describe the sea in many more words than that.", "Hi there"]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def wordy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wordy"), init_range=0.3, hidden_size=64)


@pytest.fixture(scope="module", params=KERNELS)
def decoders(
    wordy_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> tuple[FastDecoder, FastDecoder, Any]:
    """The same int8 model twice: one decodes eagerly, the other through compiled packages
    (for each int8 kernel: the CPU picks one, and a compiled step calls either)."""
    model = AutoModelForCausalLM.from_pretrained(wordy_dir, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    twins = [
        FastDecoder(
            model.config, Weights(state), "int8", "cpu", torch.float32, 4, None, request.param
        )
        for _ in range(2)
    ]
    eager, compiled = twins
    folder = tmp_path_factory.mktemp("packages") / "step"
    hf_compile.build(compiled, folder)
    native = [hf_fbgemm.NATIVE] if request.param == "fbgemm" else []  # the C++ operators
    packages = hf_compile.packages_for(compiled)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*packages, *native])
    if request.param == "vnni":  # heads of 16: the C++ attention, prompts as rows of tokens
        assert "tokens.pt2" in packages and compiled.tokens_together()
    compiled.compiled = hf_compile.CompiledStep(compiled, folder)
    return eager, compiled, AutoTokenizer.from_pretrained(wordy_dir)


def _decode(decoder: FastDecoder, rows: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Greedy steps for `rows` together, from their prompts; the logits of each step."""
    tokens = [int(decoder.prefill(slot, ids).argmax()) for slot, ids in enumerate(rows)]
    positions = [len(ids) for ids in rows]
    out = []
    for _ in range(steps):
        logits = decoder.decode(tokens, positions)
        out.append(logits)
        tokens = [int(t) for t in logits.argmax(-1)]
        positions = [p + 1 for p in positions]
    return out


@needs_compiler
@torch.inference_mode()
def test_the_compiled_step_answers_as_the_eager_one_in_every_shape(
    decoders: tuple[FastDecoder, FastDecoder, Any],
) -> None:
    """Prompts, one row and three, across the cache growing (256 -> 512 positions): close
    logits, the same greedy tokens, and every call through a package (none fell back to
    eager) but a one-token prompt's."""
    eager, compiled, tokenizer = decoders
    for rows in ([_ids(tokenizer, PROMPTS[0])], [_ids(tokenizer, p) for p in PROMPTS]):
        rows = [ids + [7] * (250 - len(ids)) if i == 0 else ids for i, ids in enumerate(rows)]
        ours, theirs = _decode(compiled, rows, 12), _decode(eager, rows, 12)
        assert compiled.capacity == eager.capacity == 512  # grew mid-way
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert compiled.compiled.eager_steps == 0
    one = _ids(tokenizer, "Hi")[:1]
    torch.testing.assert_close(compiled.prefill(0, one), eager.prefill(0, one))
    assert compiled.compiled.eager_steps == 1


@needs_compiler
@torch.inference_mode()
def test_compiled_rows_do_not_depend_on_their_batch(
    decoders: tuple[FastDecoder, FastDecoder, Any],
) -> None:
    """A row alone (the one-row package) and beside two others (the many-row one), one of
    them over 150 tokens longer, so the step attends over a wider window: bit for bit, so a
    request that joins a batch answers as it would alone."""
    _, compiled, tokenizer = decoders
    rows = [_ids(tokenizer, p) for p in PROMPTS]
    rows[1] = (rows[1] * 40)[:160]
    assert compiled.width(len(rows[0]) + 6) < compiled.width(len(rows[1]))
    alone = _decode(compiled, rows[:1], 6)
    together = _decode(compiled, rows, 6)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a[0], b[0])


@needs_compiler
@torch.inference_mode()
def test_a_model_of_one_row_compiles_its_step_and_prompts(wordy_dir: Path, tmp_path: Path) -> None:
    """`max_batch: 1` (the default): no many-row package, prompts of one slot; every call
    after the build goes through a package."""
    model = AutoModelForCausalLM.from_pretrained(wordy_dir, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    decoder = FastDecoder(model.config, Weights(state), "int8", "cpu", torch.float32, 1)
    hf_compile.build(decoder, tmp_path / "step")
    names = sorted(p.name for p in (tmp_path / "step").iterdir() if p.suffix == ".pt2")
    assert names == sorted(hf_compile.packages_for(decoder)) and "many.pt2" not in names
    decoder.compiled = hf_compile.CompiledStep(decoder, tmp_path / "step")
    ids = _ids(AutoTokenizer.from_pretrained(wordy_dir), PROMPTS[0])
    _decode(decoder, [ids], 3)
    assert decoder.compiled.eager_steps == 0


def test_why_not_names_the_reason(wordy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_model(ModelKey(str(wordy_dir)), "cpu", "auto", None, "int8", 1)
    assert hf_compile.why_not(loaded.runner, "off") == "compile: off"
    monkeypatch.setenv("OMNIMIND_COMPILE", "off")
    assert hf_compile.why_not(loaded.runner, "auto") == "OMNIMIND_COMPILE=off"
    monkeypatch.setenv("OMNIMIND_COMPILE", "auto")
    assert hf_compile.why_not(loaded.runner, "auto") is None
    monkeypatch.setenv("PATH", str(wordy_dir))  # no compiler on it
    monkeypatch.setenv("CXX", "omnimind-no-such-c++")
    assert (
        hf_compile.why_not(loaded.runner, "on") == "no C++ compiler (omnimind-no-such-c++) on PATH"
    )


@needs_compiler
def test_a_failed_compile_is_remembered_not_repeated(
    wordy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiler that fails: the child's compile fails, the model decodes eagerly, and the
    failure is noted beside the packages' folder, so the next start says so at once instead
    of compiling for minutes again; deleting the note tries again."""
    broken = tmp_path / "broken-c++"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("OMNIMIND_CACHE_DIR", str(tmp_path / "cache"))
    recipe = hf_compile.Recipe(str(wordy_dir), None, "auto", "int8", 1)

    closed = threading.Event()

    def started() -> FastDecoder:
        runner = load_model(ModelKey(str(wordy_dir)), "cpu", "auto", None, "int8", 1).runner
        hf_compile.start(runner, recipe, "on", busy=lambda: False, stopped=closed.is_set)
        return runner

    first = started()
    deadline = time.monotonic() + 600
    while first.compile_status in ("waiting", "compiling"):
        assert time.monotonic() < deadline, "the failing compile took over 10 minutes"
        time.sleep(0.2)
    assert first.compile_status.startswith("failed (")
    assert first.compiled is None
    note = hf_compile.failure_note(hf_compile.folder_for(first, recipe))
    assert note.read_text().strip()  # the reason
    second = started()
    assert second.compile_status.startswith("failed (") and str(note) in second.compile_status
    note.unlink()
    third = started()
    assert third.compile_status == "waiting"  # compiling again
    closed.set()  # the gateway closes: the thread stops before (or kills) the child
    while third.compile_status in ("waiting", "compiling"):
        time.sleep(0.1)
    assert third.compile_status == "off (closed)"


@needs_compiler
def test_a_compile_that_cannot_be_noted_fails_quietly(
    wordy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache folder is not a folder: the child fails before it made anything, noting the
    failure fails too, and that is a warning, not the compile thread's traceback."""
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("OMNIMIND_CACHE_DIR", str(blocked))
    runner = load_model(ModelKey(str(wordy_dir)), "cpu", "auto", None, "int8", 1).runner
    recipe = hf_compile.Recipe(str(wordy_dir), None, "auto", "int8", 1)
    hf_compile.start(runner, recipe, "on", busy=lambda: False, stopped=lambda: False)
    deadline = time.monotonic() + 600
    while runner.compile_status in ("waiting", "compiling"):
        assert time.monotonic() < deadline, "the failing compile took over 10 minutes"
        time.sleep(0.2)
    assert runner.compile_status.startswith("failed (")
    for thread in threading.enumerate():  # its last lines: noting the failure
        if thread.name == hf_compile.COMPILE_THREAD:
            thread.join(30)
            assert not thread.is_alive()


# ---- behind the gateway -------------------------------------------------------------------------


_CONFIG = """
providers:
  hf: {{type: huggingface, compile: on, max_concurrency: 2, max_batch: 2, max_new_tokens: 16}}
  quiet: {{type: huggingface, max_new_tokens: 16}}
models:
  tiny: [{{provider: hf, model: '{wordy_dir}'}}]
  tiny-eager: [{{provider: quiet, model: '{wordy_dir}'}}]
"""


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, wordy_dir: Path) -> UvicornServer:
    return start_gateway(_CONFIG.format(wordy_dir=wordy_dir))


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _model_stats(gw: UvicornServer, provider: str) -> dict[str, Any]:
    data = httpx.get(f"{gw.url}/v1/providers", timeout=30).json()["data"]
    local = next(p["local"] for p in data if p["id"] == provider)
    return dict(next(iter(local["models"].values())))


def _compile_status(gw: UvicornServer, provider: str) -> str:
    return str(_model_stats(gw, provider)["compile"])


@needs_compiler
def test_the_gateway_swaps_the_compiled_step_in_and_a_restart_finds_it(
    client: openai.OpenAI, gw: UvicornServer, start_gateway: GatewayFactory, wordy_dir: Path
) -> None:
    """`compile: on`: the first answer comes at once (eager); once the model is quiet a
    child process compiles the step, it is swapped in, and the same greedy request answers
    the same text from it (`system_fingerprint` says which). A second gateway on the same
    cache answers its very first request compiled. `compile` left at `auto` is off under
    OMNIMIND_COMPILE=off, as this suite runs."""
    assert os.environ.get("OMNIMIND_COMPILE") == "off"
    ask = {"messages": [{"role": "user", "content": PROMPTS[1]}], "temperature": 0}
    first = client.chat.completions.create(model="tiny", **ask)  # type: ignore[call-overload]
    assert first.system_fingerprint == "fast-cpu-float32-int8"
    deadline = time.monotonic() + 600
    while (status := _compile_status(gw, "hf")) in ("waiting", "compiling"):
        assert time.monotonic() < deadline, "compiling took over 10 minutes"
        time.sleep(0.5)
    assert status == "ready"
    again = client.chat.completions.create(model="tiny", **ask)  # type: ignore[call-overload]
    assert again.system_fingerprint == "fast-cpu-float32-int8-compiled"
    assert again.choices[0].message.content == first.choices[0].message.content
    assert _model_stats(gw, "hf")["int8_kernel"] == best_kernel()  # the CPU's, shown
    client.chat.completions.create(model="tiny-eager", **ask)  # type: ignore[call-overload]
    assert _compile_status(gw, "quiet") == "off (OMNIMIND_COMPILE=off)"
    compiled = hf_cache.cache_root() / "compiled"
    stale, other = compiled / "an-old-key", compiled / "another-model"  # other keys' packages
    for folder, days in ((stale, hf_cache.UNUSED_DAYS + 1), (other, 1)):
        (folder / "one.pt2").parent.mkdir(parents=True)
        (folder / "one.pt2").write_bytes(b"package")
        os.utime(folder, (time.time() - days * 86400,) * 2)
    restarted = start_gateway(_CONFIG.format(wordy_dir=wordy_dir))
    with openai.OpenAI(base_url=f"{restarted.url}/v1", api_key="unused", max_retries=0) as c:
        fresh = c.chat.completions.create(model="tiny", **ask)  # type: ignore[call-overload]
    assert fresh.system_fingerprint == "fast-cpu-float32-int8-compiled"
    assert fresh.choices[0].message.content == first.choices[0].message.content
    assert other.is_dir() and not stale.exists()  # unused for a month: removed at the start
