"""Converted weights kept between starts, so a restart loads in seconds, not minutes.

Loading a GGUF file de-quantises every tensor (about 20 s for SmolLM2-135M on two cores).
After the first load the converted checkpoint (config, tokenizer, safetensors) is saved in
`$OMNIMIND_CACHE_DIR`, else `$XDG_CACHE_HOME/omnimind`, else `~/.cache/omnimind`, under
`weights/<key>`. The key hashes the source folder, the GGUF file (name, size, modification
time), the stored dtype, and the versions of torch, transformers and this format, so an
edited file or an upgraded library never reads a stale conversion. A folder is written
under a temporary name and renamed when complete: a crash mid-write or two workers
converting at once leave no half-written entry. Only GGUF files are converted and kept:
a safetensors checkpoint is read as it is (a copy would double its size on disk for no
gain), and hub ids live in `transformers`' own hub cache.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

FORMAT = 1
COMPLETE = "omnimind-complete"


def cache_root() -> Path:
    if os.environ.get("OMNIMIND_CACHE_DIR"):
        return Path(os.environ["OMNIMIND_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "omnimind"


def entry_for(source: str, gguf_file: str | None, stored_dtype: torch.dtype) -> Path | None:
    """Where the conversion of this GGUF file lives; None when there is nothing to convert."""
    path = Path(source) / gguf_file if gguf_file else None
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    parts: list[Any] = [FORMAT, str(path.resolve()), str(stored_dtype)]
    parts += [torch.__version__, transformers.__version__, stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()
    return cache_root() / "weights" / digest[:32]


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE).is_file()


def save(entry: Path, model: Any, tokenizer: Any, stored_dtype: torch.dtype) -> None:
    """Write the converted checkpoint (atomically: a temporary folder, then a rename)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=entry.parent))
    try:
        _save_checkpoint(scratch, model, stored_dtype)
        tokenizer.save_pretrained(scratch)
        (scratch / COMPLETE).write_text("ok\n")
        try:
            scratch.rename(entry)
        except OSError:  # another process finished the same conversion first
            if not is_complete(entry):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _save_checkpoint(folder: Path, model: Any, dtype: torch.dtype) -> None:
    """config.json, generation_config.json and model.safetensors, as `save_pretrained` writes
    them; by hand, since `transformers` refuses to save a model it read from a GGUF file."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied to a tensor already kept (lm_head = embeddings)
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to(dtype).contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config = copy.deepcopy(model.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
