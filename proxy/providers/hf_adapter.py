"""The `huggingface` provider's adapter: chat (and raw completions, where the generating
provider declares them) by `hf_provider`, embeddings by `hf_embed`, one provider to the chain.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from ..config import Entry, ProviderConfig
from ..embeddings import embedding_request
from ..errors import InvalidRequest, UpstreamError
from ..policy import client_error
from ..reasons import Reason
from .base import Call, Completion, Op
from .hf_embed import EmbedOptions, LocalEmbedder
from .hf_worker import wait_quiet

DEFER_S = 30.0


class LocalAdapter:
    """The `huggingface` provider: embeddings served here, chat (and raw completions, where
    the generating adapter declares `Op.COMPLETION` in its `ops`) by the generating one."""

    def __init__(self, generating: Any, config: ProviderConfig) -> None:
        spec = config.spec
        self.name = config.name
        self._generating = generating
        token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
        self._embedder = LocalEmbedder(spec.device, spec.dtype, token)
        self._preloads_started = threading.Event()  # set: no embedding preload still to start
        self._preloads_started.set()
        self._ops: frozenset[Op] = getattr(generating, "ops", frozenset({Op.CHAT}))

    def preload(self, entries: Iterable[Entry]) -> None:
        """Chat models first; embedding models once those are in (two loads at once on a
        small CPU would each take as long as both)."""
        entries = list(entries)
        self._generating.preload([e for e in entries if e.kind != "embedding"])
        models = [e.model for e in entries if e.kind == "embedding"]
        if models:
            self._preloads_started.clear()  # not ready until these loads have started (and ended)
            threading.Thread(
                target=self._preload_embeddings, args=(models,), name="omnimind-hf-preload",
                daemon=True,
            ).start()  # fmt: skip

    def _preload_embeddings(self, models: list[str]) -> None:
        """Once the chat models are in and none has decoded for `hf_worker.QUIET_S`: loading
        an embedding model (transformers' imports, ~2.5 s of CPU) beside the first chat
        answers of a fresh start made them take twice as long. At most `DEFER_S` later; an
        embeddings request before that loads its model at once."""
        settle = getattr(self._generating, "settle", None)
        if settle is not None:
            settle()
        busy = getattr(self._generating, "busy", None)
        give_up_at = time.monotonic() + DEFER_S
        if busy is not None:
            wait_quiet(busy, lambda: self._embedder.closed or time.monotonic() > give_up_at)
        for model in models:
            self._embedder.preload(model)
        self._preloads_started.set()

    def ready(self) -> bool:
        ready = self._preloads_started.is_set() and self._embedder.ready()
        return bool(self._generating.ready()) and ready

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._generating.stats()
        return stats

    async def complete(self, call: Call) -> Completion:
        if call.op is Op.EMBEDDING:
            try:
                checked = embedding_request(call.request)
            except InvalidRequest as exc:
                raise client_error(exc.message, exc.param) from None
            options = EmbedOptions(truncate=call.entry.truncate)
            return await self._embedder.embed(checked, call.entry.model, options)
        self._check(call.op)
        result: Completion = await self._generating.complete(call)
        return result

    def stream(self, call: Call) -> AsyncIterator[bytes]:
        if call.op is Op.EMBEDDING:
            raise UpstreamError(Reason.UNSUPPORTED, "embeddings are not streamed")
        self._check(call.op)
        chunks: AsyncIterator[bytes] = self._generating.stream(call)
        return chunks

    def _check(self, op: Op) -> None:
        if op not in self._ops:
            raise UpstreamError(Reason.UNSUPPORTED, f"local inference does not serve {op} yet")

    async def aclose(self) -> None:
        await self._embedder.aclose()
        await self._generating.aclose()
