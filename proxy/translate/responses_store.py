"""A bounded in-memory store of responses, for `previous_response_id`.

Each stored response keeps its whole conversation as chat messages (the earlier turns,
its input, and its output; never its `instructions`, which OpenAI does not carry over).
The store holds at most `max_responses` responses and `max_bytes` of encoded messages,
and forgets the least recently used first. It lives in one process: with several
workers a follow-up may land on a worker that never saw the response, and gets the same
clear 400 as an expired one. A response is only given back to the API key that made it.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from .chat import ChatMessage

MAX_RESPONSES = 1024
MAX_BYTES = 64 * 1024 * 1024

_messages = msgspec.json.Decoder(list[ChatMessage])
_encode = msgspec.json.Encoder().encode


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        return self._bytes

    def put(self, response_id: str, owner: str, messages: list[ChatMessage]) -> bool:
        """Keep a conversation; False when it alone is over the byte limit (not kept)."""
        data = _encode(messages)
        if len(data) > self.max_bytes:
            return False
        self._drop(response_id)
        self._items[response_id] = (owner, data)
        self._bytes += len(data)
        while len(self._items) > self.max_responses or self._bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self._bytes -= len(old)
        return True

    def get(self, response_id: str, owner: str) -> list[ChatMessage] | None:
        item = self._items.get(response_id)
        if item is None or item[0] != owner:
            return None
        self._items.move_to_end(response_id)
        return _messages.decode(item[1])

    def _drop(self, response_id: str) -> None:
        old = self._items.pop(response_id, None)
        if old is not None:
            self._bytes -= len(old[1])
