"""Cheap token estimates, for the context-window rule and Anthropic's count_tokens.

No tokenizer is run on the request path: the estimate counts the UTF-8 bytes of the
text the model would read and assumes 3 bytes a token. English averages about 4 bytes a
token with the usual BPE vocabularies, so the estimate errs toward "too long": an entry
is skipped a little early rather than sent a prompt it must refuse.
"""

from __future__ import annotations

import msgspec

from .wire import ApiRequest

BYTES_PER_TOKEN = 3
_PROMPT_FIELDS = ("messages", "prompt", "input", "system", "instructions", "tools")
_any = msgspec.json.Decoder()


def estimate_text(text: str) -> int:
    return (len(text.encode()) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN


def estimate_prompt(request: ApiRequest) -> int:
    """Tokens the prompt fields of a request take, estimated (see module doc)."""
    total = 0
    for name in _PROMPT_FIELDS:
        raw = request.fields.get(name)
        if raw is not None:
            total += estimate_text(" ".join(_strings(_any.decode(raw))))
    return total


def _strings(value: object) -> list[str]:
    """Every string in a JSON value (keys of tool schemas included), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v)) if k != "type"]
    return []
