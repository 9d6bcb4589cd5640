"""Constrained decoding for the local model: `response_format` and forced tool calls.

`output_rule()` turns a request's `response_format`, `tools` and `tool_choice` into an
`OutputRule` (None: free text). `Grammars` compiles rules with llguidance for one tokenizer
(compiled schemas are kept, 64 at most); each request gets its own `Matcher`, which masks one
logits row per step and follows the sampled tokens. JSON comes out compact (no whitespace
between tokens), so a small model cannot ramble in whitespace. `json_schema` enforces the
schema whether `strict` is true or false; without `strict: true` (for tools: on every forced
function) keywords llguidance does not implement (e.g. `not`) are ignored, not rejected.
llguidance follows JSON Schema: `additionalProperties` is true unless the schema says not.

Cost with SmolLM2's tokenizer (49152 tokens), float32 logits on the CPU, nested json_schema,
on a busy 2-core machine: mask ~100 µs a token (llguidance ~35, applying it the rest),
accept ~6 µs; `Grammars()` ~0.7 s; `matcher()` ~2 ms compiling a schema, ~0.05 ms cached.
"""

from __future__ import annotations

import copy
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

Kind = Literal["json_object", "json_schema", "tool_call"]
CACHE_SIZE = 64
# the logit ceilings one mask byte sets for its 8 tokens, least significant bit first:
# +inf (allowed: unchanged) or -inf (forbidden)
CEILINGS_BY_BYTE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
    np.float32(np.inf),
    np.float32(-np.inf),
)
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class GrammarError(ValueError):
    """The rule cannot be compiled or followed (a client error: HTTP 400)."""


@dataclass(frozen=True)
class OutputRule:
    """What the generated text must be.

    `schema_json` is the JSON schema of the whole output; for a tool call it is the
    function's `parameters` (one tool: the text is the arguments object) or an anyOf of
    `{"name": <const>, "arguments": <parameters>}` objects (several tools).
    """

    kind: Kind
    schema_json: str
    tool_names: tuple[str, ...] = ()
    lenient: bool = False

    @property
    def schema(self) -> dict[str, Any]:
        return dict(json.loads(self.schema_json))


def output_rule(
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
) -> OutputRule | None:
    """The request's rule (None: free text); a forced tool call wins over `response_format`.

    ValueError, with a message for the client, if the three do not make a valid request.
    """
    functions = _functions(tools) if tools and tool_choice != "none" else {}
    if isinstance(tool_choice, dict):
        chosen = tool_choice.get("function")
        name = chosen.get("name") if isinstance(chosen, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice must be {'type': 'function', 'function': {'name': ...}}")
        if name not in functions:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        return _tool_rule([functions[name]])
    if tool_choice == "required":
        if not functions:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return _tool_rule(list(functions.values()))
    if tool_choice not in (None, "auto", "none"):
        raise ValueError(f"unsupported tool_choice: {tool_choice!r}")
    return _format_rule(response_format)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    functions: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise ValueError("each tool must be {'type': 'function', 'function': {...}}")
        name, parameters = function.get("name"), function.get("parameters", NO_PARAMETERS)
        if not isinstance(name, str) or not name:
            raise ValueError("each tool function needs a name")
        if not isinstance(parameters, dict):
            raise ValueError(f"the parameters of tool {name!r} must be a JSON schema object")
        functions[name] = {**function, "parameters": parameters}
    return functions


def _tool_rule(functions: list[dict[str, Any]]) -> OutputRule:
    names = tuple(function["name"] for function in functions)
    if len(functions) == 1:
        schema = functions[0]["parameters"]
    else:
        schema = {"anyOf": [_named_call(i, function) for i, function in enumerate(functions)]}
    lenient = not all(function.get("strict") is True for function in functions)
    return OutputRule("tool_call", _dumps(schema), names, lenient)


def _named_call(index: int, function: dict[str, Any]) -> dict[str, Any]:
    # an $id of their own keeps the parameters' "#/$defs/..." references inside them
    arguments = {"$id": f"urn:tool:{index}", **function["parameters"]}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _format_rule(response_format: dict[str, Any] | None) -> OutputRule | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputRule("json_object", _dumps({"type": "object"}))
    if kind != "json_schema":
        raise ValueError(f"unsupported response_format type: {kind!r}")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(schema, dict):
        raise ValueError("response_format json_schema needs a 'schema' object")
    return OutputRule("json_schema", _dumps(schema), lenient=spec.get("strict") is not True)


def tool_call_from_text(rule: OutputRule, text: str) -> tuple[str, str]:
    """The forced call's function name and arguments JSON. ValueError if `text` is not one
    (e.g. cut short by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the generated tool call is not complete JSON: {exc}") from None
    if len(rule.tool_names) == 1:
        name, arguments = rule.tool_names[0], value
    elif isinstance(value, dict) and value.get("name") in rule.tool_names:
        name, arguments = value["name"], value.get("arguments", {})
    else:
        raise ValueError("the generated tool call names none of the tools")
    return name, _dumps(arguments)


def _lltokenizer(backend: Any, eos: int | list[int] | None) -> LLTokenizer:
    """llguidance's view of a fast tokenizer (`transformers`' or `hf_tokenizer`'s): what
    `llguidance.hf.from_tokenizer` does, without importing `transformers` for it."""
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return LLTokenizer(backend.to_str(), eos_token=eos)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Grammars:
    """Compiles rules for one (fast) tokenizer; `matcher()` may be called from any thread.

    `vocab_size` is the width of the model's logits rows (it may exceed the tokenizer's
    vocabulary); `eos_token_ids` default to the tokenizer's EOS token.
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None = None
    ) -> None:
        eos = list(eos_token_ids) if eos_token_ids else tokenizer.eos_token_id
        self._tokenizer = _lltokenizer(tokenizer.backend_tokenizer, eos)
        self._vocab_size = vocab_size
        self._limits = LLParserLimits(verbose_errors=False)
        self._compiled: OrderedDict[tuple[str, bool], LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, rule: OutputRule) -> Matcher:
        """A fresh matcher for one request; GrammarError if the schema cannot be compiled."""
        key = (rule.schema_json, rule.lenient)
        with self._lock:
            compiled = self._compiled.pop(key, None)
        if compiled is None:
            compiled = self._compile(*key)
        with self._lock:
            self._compiled[key] = compiled  # the most recently used last
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
            fresh = compiled.deep_copy()
        return Matcher(fresh, self._tokenizer.vocab_size, self._vocab_size)

    def _compile(self, schema_json: str, lenient: bool) -> LLMatcher:
        try:
            grammar = LLMatcher.grammar_from_json_schema(
                schema_json, defaults={"whitespace_flexible": False, "lenient": lenient}
            )
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None
        compiled = LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        if compiled.is_error():
            raise GrammarError(f"cannot enforce this JSON schema: {compiled.get_error()}")
        return compiled


class Matcher:
    """One request's grammar state: `mask()` a logits row, `accept()` the sampled token."""

    def __init__(self, matcher: LLMatcher, tokenizer_vocab: int, vocab_size: int) -> None:
        self._matcher = matcher
        self._bitmask = allocate_token_bitmask(1, tokenizer_vocab)
        bits = self._bitmask.size * 32
        # ids past the tokenizer's (padding in the logits) keep a ceiling of -inf
        self._ceilings = np.full(max(bits, vocab_size), -np.inf, dtype=np.float32)
        self._ceilings_by_byte = self._ceilings[:bits].reshape(-1, 8)
        self._vocab_size = vocab_size

    def mask(self, logits_row: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids now to -inf, in place: padding ids
        always, EOS whenever the output is not complete yet."""
        fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        mask_bytes = self._bitmask.view(np.uint8)[0]
        np.take(CEILINGS_BY_BYTE, mask_bytes, axis=0, out=self._ceilings_by_byte)
        ceilings = self._ceilings[: self._vocab_size]
        if logits_row.device.type == "cpu" and logits_row.dtype == torch.float32:
            # numpy stays on this thread: torch would share 49k elements out to its thread pool
            row = logits_row.numpy()
            np.minimum(row, ceilings, out=row)
        else:
            on_device = torch.from_numpy(ceilings).to(logits_row.device, logits_row.dtype)
            torch.minimum(logits_row, on_device, out=logits_row)

    def accept(self, token_id: int) -> None:
        """Advance past the sampled token; GrammarError if the grammar forbids it."""
        if not self._matcher.consume_token(token_id):
            raise GrammarError(self._matcher.get_error())

    def finished(self) -> bool:
        """The output is complete: generation must end now."""
        return self._matcher.is_stopped()
