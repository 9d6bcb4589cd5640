"""Many finished requests' outcomes as one call of the `AFTER` script.

Outcomes queue for a couple of milliseconds and go out together: usage summed per key and
per alias, token charges summed per bucket, health events and cache entries as they are.
Under load one write then carries dozens of requests (bench/state_bench.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .base import Outcome, counted


def after_args(prefix: str, outcomes: Iterable[Outcome]) -> list[Any]:
    usage: dict[tuple[str, str], list[Any]] = {}
    charges: dict[str, list[int]] = {}
    events: list[Any] = []
    puts: list[Any] = []
    for o in outcomes:
        names = [("a", o.alias)] if o.alias else []
        if counted(o.key_id):
            names.append(("k", o.key_id))
        for name in names:
            row = usage.setdefault(name, [0, 0, 0, 0, 0.0])
            row[0] += 1
            if o.cached:
                row[1] += 1
            else:
                row[2] += o.prompt_tokens
                row[3] += o.completion_tokens
                row[4] += o.cost_usd
        tokens = o.prompt_tokens + o.completion_tokens
        if o.tpm and tokens and not o.cached:
            charge = charges.setdefault(o.key_id, [o.tpm, 0])
            charge[1] += tokens
        for e in o.health:
            events += [e.id, e.reason, max(0, round(e.seconds * 1000))]
        put = o.cache_put
        if put is not None:
            puts += [put.key, max(1, round(put.ttl * 1000)), put.max_entries, put.body]
    args: list[Any] = [prefix, len(usage)]
    for (kind, label), (requests, cached, prompt, completion, cost) in usage.items():
        args += [kind, label, requests, cached, prompt, completion, repr(cost) if cost else 0]
    args.append(len(charges))
    for key_id, (tpm, tokens) in charges.items():
        args += [key_id, tpm, tokens]
    args += [len(events) // 3, *events, len(puts) // 4, *puts]
    return args
