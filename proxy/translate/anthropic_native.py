"""An Anthropic client served by an Anthropic upstream, relayed without a round trip.

`/v1/messages` sends the chain a chat request (every provider can serve that) which also
carries the client's own Messages body (`NativeChat.native`). An `anthropic` provider
sends that body upstream as it came (only `model` and `stream` set: `top_k`, `thinking`,
`cache_control`, documents and all pass), and returns its usual chat answer with the
upstream's own message, or each of its own events, riding along in `NATIVE_FIELD`; the
route then answers with those bytes instead of translating the chat answer back. Any
other provider ignores `native` and is translated both ways as usual.
"""

from __future__ import annotations

import msgspec

from ..wire import ChatRequest

NATIVE_FIELD = "x_omnimind_anthropic"
_MARK = b'"' + NATIVE_FIELD.encode() + b'"'
_encode = msgspec.json.Encoder().encode
_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])


class NativeChat(ChatRequest):
    """A chat request translated from a Messages request, with the client's original body."""

    __slots__ = ("native",)

    def __init__(self, chat: bytes, native: bytes) -> None:
        super().__init__(chat)
        self.native = native

    def native_body(self, model: str, stream: bool) -> bytes:
        """The client's Messages body for `model`, streamed or not; nothing else changes."""
        fields = _fields.decode(self.native)
        fields["model"] = msgspec.Raw(_encode(model))
        fields["stream"] = msgspec.Raw(b"true" if stream else b"false")
        return _encode(fields)


def attach(payload: bytes, native: bytes) -> bytes:
    """A chat answer or chunk (a JSON object) with the upstream's own bytes riding along."""
    return payload[:-1] + b"," + _MARK + b":" + native + b"}"


class _Carrier(msgspec.Struct):
    x_omnimind_anthropic: msgspec.Raw = msgspec.Raw(b"")


class _Typed(msgspec.Struct):
    type: str = ""


_carrier = msgspec.json.Decoder(_Carrier)
_typed = msgspec.json.Decoder(_Typed)


def native_of(payload: bytes) -> bytes | None:
    """The upstream's own bytes in a chat answer or chunk, None if it carries none."""
    if _MARK not in payload:
        return None
    raw = bytes(_carrier.decode(payload).x_omnimind_anthropic)
    return raw or None


def native_frame(event: bytes) -> bytes:
    """An upstream event as Anthropic frames it."""
    kind = _typed.decode(event).type or "message"
    return b"event: " + kind.encode() + b"\ndata: " + event + b"\n\n"
