"""`POST /v1/embeddings`: OpenAI's wire shapes, the checks every provider shares, and the
answer builders the translating adapters (Ollama, local) use.

A request is checked once, before the chain runs, so a malformed one is a 400 that never
reaches a provider: `input` must be a non-empty string, a non-empty list (at most
`MAX_INPUTS`) of non-empty strings, a non-empty list of token ids, or a list of such
lists; `encoding_format` is `float` or `base64`; `dimensions` is a positive integer.
What a given provider cannot do (token ids on Ollama, `dimensions` on a model without
Matryoshka training, an input over a model's window) is the adapter's `unsupported` /
`context_too_long`, so the next entry may serve it.

`base64` is OpenAI's: each vector as little-endian float32 bytes, base64-encoded (the
official Python client asks for it by default and decodes it itself).
"""

from __future__ import annotations

import array
import base64
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from .errors import InvalidRequest
from .pipeline import Context, Reply
from .providers import Op
from .routes_chat import serve
from .wire import ApiRequest, Raw

MAX_INPUTS = 2048  # OpenAI's limit on the number of inputs in one request

EncodingFormat = Literal["float", "base64"]


class EmbeddingBody(msgspec.Struct, kw_only=True):
    """The request body, typed. `input` is checked by `embedding_inputs`."""

    model: str
    input: Any = None
    encoding_format: EncodingFormat | None = None
    dimensions: int | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A checked request: either `texts` or `tokens` holds the inputs, in the client's order."""

    model: str
    texts: list[str] | None
    tokens: list[list[int]] | None
    encoding_format: EncodingFormat
    dimensions: int | None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.tokens or [])


_body_decoder = msgspec.json.Decoder(EmbeddingBody)


def parse_embedding_request(raw: bytes) -> EmbeddingRequest:
    """The request checked as OpenAI checks it; anything malformed raises `InvalidRequest`."""
    body = decode_body(_body_decoder, raw)
    if body.dimensions is not None and body.dimensions < 1:
        raise InvalidRequest("'dimensions' must be at least 1.", param="dimensions")
    texts, tokens = embedding_inputs(body.input)
    return EmbeddingRequest(
        model=body.model,
        texts=texts,
        tokens=tokens,
        encoding_format=body.encoding_format or "float",
        dimensions=body.dimensions,
    )


def decode_body(decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """A body decoded into its Struct; a wrong or missing field is a 400 naming it."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        what, at, where = text.partition(" - at ")
        param = where.strip("`").removeprefix("$").lstrip(".") or None if at else None
        missing = text.partition("missing required field `")[2].partition("`")[0]
        if missing:
            param = f"{param}.{missing}" if param else missing
            raise InvalidRequest(f"Missing required parameter: '{param}'.", param=param) from None
        raise InvalidRequest(f"Invalid request: {what or text}", param=param) from None
    except msgspec.DecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None


def embedding_inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """`input` as (texts, None) or (None, token lists); malformed input raises a 400."""
    if value is None:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _bad_input("'input' must be a string, an array of strings or of token arrays.")
    if not value:
        raise _bad_input("'input' must not be empty.")
    if len(value) > MAX_INPUTS:
        raise _bad_input(f"'input' must have at most {MAX_INPUTS} items, got {len(value)}.")
    first = value[0]
    if isinstance(first, str):
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise _bad_input(f"'input[{i}]' must be a string like the other items.")
            if not text:
                raise _bad_input(f"'input[{i}]' must not be an empty string.")
        return value, None
    if _is_token(first):  # one token array
        return None, [_tokens(value, "input")]
    if isinstance(first, list):  # an array of token arrays
        return None, [_tokens(item, f"input[{i}]") for i, item in enumerate(value)]
    raise _bad_input("'input' must be a string, an array of strings or of token arrays.")


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokens(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise _bad_input(f"'{where}' must be a non-empty array of token ids.")
    for token in value:
        if not _is_token(token) or token < 0:
            raise _bad_input(f"'{where}' must hold non-negative integer token ids only.")
    return value


def _bad_input(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="input", code="invalid_value")


class EmbeddingApiRequest(ApiRequest):
    """`POST /v1/embeddings`: the body checked once, when the request is built."""

    __slots__ = ("checked",)
    required = "input"

    def __init__(self, raw: bytes | None = None, fields: dict[str, Raw] | None = None) -> None:
        super().__init__(raw, fields)
        self.stream = self.include_usage = False  # embeddings are one answer

    def check(self) -> None:
        super().check()
        self.checked = parse_embedding_request(self.raw)


def embedding_request(request: ApiRequest) -> EmbeddingRequest:
    """The checked embedding request an adapter serves (checked here if it was not yet)."""
    if isinstance(request, EmbeddingApiRequest):
        return request.checked
    return parse_embedding_request(request.raw)


# ---- answers -----------------------------------------------------------------------------------


class EmbeddingItem(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


def vector_base64(vector: Sequence[float]) -> str:
    """OpenAI's `base64` encoding: little-endian float32 bytes, base64."""
    floats = array.array("f", vector)
    if sys.byteorder == "big":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode("ascii")


def embedding_list(
    vectors: Sequence[Sequence[float]],
    model: str,
    prompt_tokens: int,
    encoding_format: EncodingFormat,
) -> EmbeddingList:
    """The `list` answer for vectors given in the request's input order."""
    if encoding_format == "base64":
        data = [EmbeddingItem(index=i, embedding=vector_base64(v)) for i, v in enumerate(vectors)]
    else:
        data = [EmbeddingItem(index=i, embedding=list(v)) for i, v in enumerate(vectors)]
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return EmbeddingList(data=data, model=model, usage=usage)


# ---- the route ---------------------------------------------------------------------------------


async def route(ctx: Context) -> Reply:
    """`POST /v1/embeddings`: one answer from the alias's chain, like chat's (embeddings are
    never streamed; an identical request may be answered from the cache)."""
    return await serve(ctx, EmbeddingApiRequest(ctx.body), Op.EMBEDDING)
