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

Every new key (an upgrade of torch, of transformers or of this code) leaves the old entries
behind, so a load marks its entry used and removes what beside it has not been used for
`UNUSED_DAYS` (`prune`: converted weights here, compiled packages in `hf_compile`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("omnimind.huggingface")

FORMAT = 1
UNUSED_DAYS = 30  # an entry no start has used for this long is removed (`prune`)
COMPLETE = "omnimind-complete"
INT8 = "int8-v2.safetensors"  # hf_fast.Int8's values and scales; v: its recipe


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
    parts += [torch.__version__, _transformers_version(), stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()
    return cache_root() / "weights" / digest[:32]


@functools.cache
def _transformers_version() -> str:
    """Its installed version, without importing it (a second of a restart)."""
    return importlib.metadata.version("transformers")


def prune(entry: Path, now: float | None = None) -> list[Path]:
    """Mark `entry` used now; remove what beside it no start has used for `UNUSED_DAYS`
    (old keys' entries, their notes, a crashed writer's scratch). Returns what it removed;
    a failure only logs (another process may be removing the same)."""
    now = time.time() if now is None else now
    removed = []
    try:
        os.utime(entry, (now, now))
        for other in entry.parent.iterdir():
            try:
                if other == entry or other.lstat().st_mtime >= now - UNUSED_DAYS * 86400:
                    continue
                if other.is_dir() and not other.is_symlink():
                    shutil.rmtree(other)
                else:
                    other.unlink()
            except FileNotFoundError:  # another start pruned it first
                continue
            removed.append(other)
    except OSError as exc:
        log.warning("cannot prune %s: %s", entry.parent, exc)
    if removed:
        log.info("removed %d cache entries unused for %d days beside %s", len(removed),
                 UNUSED_DAYS, entry)  # fmt: skip
    return removed


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


def read_int8(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The int8 linears kept in a cache entry ({} when there are none, or they do not read)."""
    path = folder / INT8
    if not is_complete(folder) or not path.is_file():
        return {}
    try:
        flat = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file: quantise again, write anew
        log.warning("cannot read %s (%s): quantising again", path, exc)
        return {}
    names = {k.rsplit(".", 1)[0] for k in flat}
    return {n: (flat[f"{n}.values"], flat[f"{n}.scales"]) for n in names}


def write_int8(folder: Path, kept: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Keep the int8 linears beside the entry's weights (atomically; a failure only logs)."""
    if not kept or not is_complete(folder):
        return
    flat = {
        f"{n}.{part}": t
        for n, pair in kept.items()
        for part, t in zip(("values", "scales"), pair, strict=True)
    }
    scratch = folder / f".{INT8}.{os.getpid()}"
    try:
        save_file(flat, str(scratch), metadata={"format": "pt"})
        os.replace(scratch, folder / INT8)
    except OSError as exc:
        log.warning("cannot keep int8 weights in %s: %s", folder, exc)
        scratch.unlink(missing_ok=True)
