"""One request's bookkeeping: what it cost, and its one record for the observers.

`cost_usd` is a pure function of usage and the entry's prices. A `Ledger` is opened when
a request enters the chain and settled exactly once: at once for an answer or an error,
when its stream closes for a stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .config import Entry
from .errors import Attempt
from .observe import Observer, RequestRecord
from .wire import Usage

log = logging.getLogger("omnimind.accounting")

MAX_TOKENS = 100_000_000  # an upstream's usage beyond this is not believed


def cost_usd(usage: Usage | None, entry: Entry | None) -> float | None:
    """Cost from per-million-token prices; None when a needed price or count is missing."""
    if entry is None or usage is None:
        return None
    price_in, price_out = entry.input_cost_per_mtok, entry.output_cost_per_mtok
    if price_in is None and price_out is None:
        return None
    total = usage.prompt_tokens * (price_in or 0.0) + usage.completion_tokens * (price_out or 0.0)
    return round(total / 1_000_000, 8)


def clamp(usage: Usage | None) -> Usage | None:
    """Usage as the gateway believes it: counts within 0..MAX_TOKENS, the total their sum."""
    if usage is None:
        return None
    prompt, completion = _count(usage.prompt_tokens), _count(usage.completion_tokens)
    return Usage(prompt, completion, prompt + completion)


def _count(n: object) -> int:
    if type(n) is int and 0 <= n <= MAX_TOKENS:
        return n  # the usual case: one check
    return max(0, min(int(n), MAX_TOKENS)) if isinstance(n, int) else 0


class Ledger:
    """One request's record, settled once (`settle`); `on_settled` sees it afterwards."""

    __slots__ = ("observer", "rec", "started", "settled", "on_settled")

    def __init__(
        self, observer: Observer, rec: RequestRecord, on_settled: Callable[[], None]
    ) -> None:
        self.observer = observer
        self.rec = rec
        self.started = time.perf_counter()
        self.settled = False
        self.on_settled = on_settled

    def settle(
        self,
        attempts: list[Attempt],
        *,
        outcome: str = "ok",
        status: int = 200,
        error: str = "",
        usage: Usage | None = None,
        entry: Entry | None = None,
    ) -> float | None:
        """Record the request's end; returns its cost."""
        if self.settled:
            return self.rec.cost_usd
        self.settled = True
        rec = self.rec
        rec.attempts, rec.outcome, rec.status, rec.error = attempts, outcome, status, error
        usage = clamp(usage)
        if usage is not None:
            rec.prompt_tokens, rec.completion_tokens = usage.prompt_tokens, usage.completion_tokens
        rec.cost_usd = cost_usd(usage, entry)
        rec.duration_ms = (time.perf_counter() - self.started) * 1000
        try:
            self.observer.finished(rec)
        except Exception:  # observation must never break an answer
            log.exception("recording request %s failed", rec.request_id)
        self.on_settled()
        return rec.cost_usd
