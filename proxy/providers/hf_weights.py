"""Where a HuggingFace provider's weights come from, and loading them (see huggingface.py).

`entry.model` is a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"; HF_TOKEN or
HUGGING_FACE_HUB_TOKEN is passed for gated models), a local directory (absolute, relative
or `~`), or `package:<python_pkg>`: the folder of an installed Python package that holds
the files, found without importing it. `entry.gguf_file` names a GGUF file in that folder
(transformers dequantizes it). Device `auto` is cuda, then mps, then cpu.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
)

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
    """A model and its tokenizer, ready to generate; one `generate()` at a time (`lock`)."""

    model: Any
    tokenizer: Any
    device: str
    dtype: torch.dtype
    eos_ids: tuple[int, ...]
    pad_id: int | None
    load_seconds: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Requests waiting to share a batch (`hf_batch`), guarded by `waiting_changed`.
    waiting: list[Any] = field(default_factory=list)
    waiting_changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def fingerprint(self) -> str:
        """OpenAI's `system_fingerprint`: the backend configuration the answer came from."""
        return f"transformers-{self.device}-{_dtype_name(self.dtype)}"


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


def load_model(key: ModelKey, device: str, dtype: str, token: str | None) -> LoadedModel:
    """Load tokenizer and model (blocking: call it on a worker thread)."""
    started = time.perf_counter()
    source = resolve_source(key.model)
    if key.gguf_file and Path(source).is_dir() and not (Path(source) / key.gguf_file).is_file():
        raise LoadError(f"no file {key.gguf_file} in {source}")
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    log.info("loading model %s from %s on %s as %s", key, source, where, _dtype_name(torch_dtype))
    kwargs: dict[str, Any] = {"token": token} if token else {}
    if key.gguf_file:
        kwargs["gguf_file"] = key.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    log.info("model %s: tokenizer loaded after %.1f s", key, time.perf_counter() - started)
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    model.to(where)
    model.eval()
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters()) / 1e6
    log.info(
        "loaded model %s in %.1f s: %.1fM parameters on %s as %s",
        key, seconds, params, where, _dtype_name(torch_dtype),
    )  # fmt: skip
    return LoadedModel(model, tokenizer, where, torch_dtype, eos_ids, pad_id, seconds)


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
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
