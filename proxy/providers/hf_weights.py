"""Where a HuggingFace provider's weights come from, and loading them (see huggingface.py).

`entry.model` is a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"; HF_TOKEN or
HUGGING_FACE_HUB_TOKEN is passed for gated models), a local directory (absolute, relative
or `~`), or `package:<python_pkg>`: the folder of an installed Python package that holds
the files, found without importing it. `entry.gguf_file` names a GGUF file in that folder
(transformers dequantizes it). Device `auto` is cuda, then mps, then cpu.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import logging
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import hf_cache, hf_fast, hf_tokenizer

log = logging.getLogger("omnimind.huggingface")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# ---- weights -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelKey:
    model: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        return f"{self.model} ({self.gguf_file})" if self.gguf_file else self.model


class LoadError(Exception):
    """The weights could not be loaded; the message says why, for the `unavailable` error."""


@dataclass(slots=True)
class LoadedModel:
    """A model ready to generate: tokenizer, the forward passes, and its one worker thread."""

    tokenizer: Any
    device: str
    dtype: torch.dtype
    eos_ids: tuple[int, ...]
    load_seconds: float
    runner: Any  # hf_fast.FastDecoder or hf_runner.HFRunner
    packing: str  # "int8" or "none"
    from_cache: bool
    top_k: int = 0
    worker: Any = None  # hf_worker.Worker, started by the provider
    grammars: Any = None  # hf_grammar.Grammars, built on the first constrained request
    grammars_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: the backend configuration the answer came from."""
        engine = "fast" if type(self.runner).__name__ == "FastDecoder" else "transformers"
        packing = "-int8" if self.packing == "int8" else ""
        compiled = "-compiled" if getattr(self.runner, "compiled", None) is not None else ""
        return f"{engine}-{self.device}-{_dtype_name(self.dtype)}{packing}{compiled}"


def resolve_source(model: str) -> str:
    """Where `from_pretrained` finds the weights: a folder, or a hub id left as it is."""
    if model.startswith("package:"):
        return str(_package_dir(model.removeprefix("package:")))
    path = Path(model).expanduser()
    if model.startswith(("/", ".", "~")) or path.is_dir():
        if not path.is_dir():
            raise LoadError(f"no such directory: {path}")
        return str(path)
    return model


def _package_dir(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"python package '{name}' is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_device(device: str) -> str:
    """`auto`: cuda, then mps, then cpu. A device asked for must be there."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"device '{device}' is configured but CUDA is not available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LoadError("device 'mps' is configured but MPS is not available")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise LoadError(f"unknown dtype '{dtype}' (use auto, {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def load_model(
    key: ModelKey, device: str, dtype: str, token: str | None, quantize: str, slots: int
) -> LoadedModel:
    """Tokenizer and forward passes (blocking: call it on a worker thread).

    From the converted-weights cache when it has these weights (`hf_cache`); else from the
    source, converted, saved to the cache and read back from it, so that a first start and
    a restart end up with the same model (and the first start's float32 copy is freed).
    """
    started = time.perf_counter()
    source = resolve_source(key.model)
    if key.gguf_file and Path(source).is_dir() and not (Path(source) / key.gguf_file).is_file():
        raise LoadError(f"no file {key.gguf_file} in {source}")
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    packing = _packing(quantize, where)
    stored = torch.bfloat16 if packing == "int8" else torch_dtype
    entry = hf_cache.entry_for(source, key.gguf_file, stored)
    from_cache = entry is not None and hf_cache.is_complete(entry)
    log.info("loading model %s from %s", key, entry if from_cache else source)
    kwargs: dict[str, Any] = {"token": token} if token else {}
    if entry is not None and not from_cache:
        if key.gguf_file:
            kwargs["gguf_file"] = key.gguf_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        try:
            hf_cache.save(entry, model, tokenizer, stored)
        except OSError as exc:  # serve the model converted here, without a second conversion
            log.warning("cannot cache converted weights in %s: %s", entry.parent, exc)
            loaded = _build(source, where, torch_dtype, packing, slots, kwargs, model, tokenizer)
        else:
            del model
            loaded = _build(str(entry), where, torch_dtype, packing, slots, {})
    else:
        if entry is None and key.gguf_file:
            kwargs["gguf_file"] = key.gguf_file
        loaded = _build(str(entry or source), where, torch_dtype, packing, slots, kwargs)
    if entry is not None and hf_cache.is_complete(entry):
        hf_cache.prune(entry)
    gc.collect()
    _release_freed_memory()
    loaded.from_cache = from_cache
    loaded.load_seconds = time.perf_counter() - started
    how = "converted weights from the cache" if from_cache else "converted now" if entry else ""
    log.info(
        "model %s ready in %.1f s (%s%s)", key, loaded.load_seconds, loaded.fingerprint,
        f", {how}" if how else "",
    )  # fmt: skip
    return loaded


def _release_freed_memory() -> None:
    """Hand the conversion's freed buffers back to the OS (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _packing(quantize: str, device: str) -> str:
    if quantize == "auto":
        return "int8" if device == "cpu" else "none"
    if quantize == "int8" and device != "cpu":
        raise LoadError(f"quantize: int8 runs on the CPU only, not on {device}")
    return quantize


def _build(
    folder: str,
    where: str,
    dtype: torch.dtype,
    packing: str,
    slots: int,
    kwargs: dict[str, Any],
    model: Any = None,
    tokenizer: Any = None,
) -> LoadedModel:
    """Tokenizer and runner from `folder`, or from `model` and `tokenizer` already in memory."""
    if tokenizer is None:
        tokenizer = _tokenizer(folder, kwargs)
    config = _config(folder, kwargs) if model is None else model.config
    generation = _generation_config(folder, kwargs) if model is None else model.generation_config
    runner: Any
    single_file = Path(folder) / "model.safetensors"
    if hf_fast.supports(config) and single_file.is_file() and "gguf_file" not in kwargs:
        kept = hf_cache.read_int8(Path(folder)) if packing == "int8" else {}
        with safe_open(str(single_file), "pt", device="cpu") as tensors:
            weights = hf_fast.Weights(tensors, where)
            runner = hf_fast.FastDecoder(config, weights, packing, where, dtype, slots, kept)
        if packing == "int8" and not kept:  # a cache entry keeps them for the next start
            hf_cache.write_int8(Path(folder), runner.quantized())
    elif hf_fast.supports(config):  # a hub id or a sharded checkpoint: through transformers
        if model is None:
            model = _auto_model(folder, dtype, kwargs)
        weights = hf_fast.Weights(model.state_dict(), where)
        runner = hf_fast.FastDecoder(config, weights, packing, where, dtype, slots)
        del model, weights
    else:
        from .hf_runner import HFRunner

        packing = "none"
        if model is None:
            model = _auto_model(folder, dtype, kwargs)
        model.to(where).eval()
        runner = HFRunner(model, where, slots)
    eos_ids = _eos_ids(generation, tokenizer)
    top_k = int(getattr(generation, "top_k", 0) or 0) if generation is not None else 0
    return LoadedModel(tokenizer, where, dtype, eos_ids, 0.0, runner, packing, False, top_k)


def _auto_model(folder: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)


def _tokenizer(folder: str, kwargs: dict[str, Any]) -> Any:
    """The checkpoint's tokenizer: a plain fast one (what `hf_cache` saves) without
    `transformers` (`hf_tokenizer`: a second or more of a restart), others through it."""
    lean = None if kwargs else hf_tokenizer.load(folder)
    if lean is not None:
        return lean
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, **kwargs)


def _config(folder: str, kwargs: dict[str, Any]) -> Any:
    """The model's config. A saved checkpoint's config.json is read as plain attributes when
    the fast decoder can run it: `AutoConfig` imports modules that cost a second or two."""
    saved = Path(folder) / "config.json"
    if saved.is_file() and "gguf_file" not in kwargs:
        plain = types.SimpleNamespace(**json.loads(saved.read_text()))
        if hf_fast.supports(plain):
            return plain
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, **kwargs)


def _generation_config(folder: str, kwargs: dict[str, Any]) -> Any:
    """Only `eos_token_id` and `top_k` are read: a saved file as plain attributes (importing
    `GenerationConfig` costs about a second), anything else through transformers."""
    saved = Path(folder) / "generation_config.json"
    if saved.is_file() and not kwargs:
        return types.SimpleNamespace(**json.loads(saved.read_text(encoding="utf-8")))
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder, **kwargs)
    except OSError:  # the checkpoint has none
        return None


def _eos_ids(generation: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    configured = generation.eos_token_id if generation is not None else None
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise LoadError("the model has no end-of-sequence token")
    return tuple(dict.fromkeys(ids))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(exc: BaseException) -> str:
    if isinstance(exc, LoadError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return f"out of memory: {exc}".strip()
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
