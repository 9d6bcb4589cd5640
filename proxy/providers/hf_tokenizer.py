"""A saved fast tokenizer without `transformers`: the `tokenizers` library + its template.

Importing `transformers` and building a tokenizer through it costs 1–3 s on two cores (the
package's own imports, and AutoTokenizer importing the model's configuration module and,
through it, torch.distributed and sympy): most of a restart. A checkpoint that `hf_cache`
saved holds a plain fast tokenizer (`tokenizer.json`, `tokenizer_config.json` naming the
plain class, and the chat template); `load` reads those files, and renders the chat
template the way `transformers` does: a sandboxed jinja2 environment with `trim_blocks`,
`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, and `tojson` without
ASCII escapes. Anything else (another tokenizer class, a template using `transformers`'
own tags) returns None, and the caller takes `transformers`' way. The ids, text and
template it gives equal AutoTokenizer's (tests/test_hf_tokenizer.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

PLAIN_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class LeanTokenizer:
    """What the local provider asks of a tokenizer, and nothing else."""

    def __init__(self, backend: Tokenizer, special: dict[str, str], template: str | None) -> None:
        self.backend_tokenizer = backend  # the name llguidance and transformers use
        self.special_tokens_map = special
        self.chat_template = template
        self._compiled = _environment().from_string(template) if template else None
        self.eos_token_id = self._id(special.get("eos_token"))
        self.bos_token_id = self._id(special.get("bos_token"))
        self.pad_token_id = self._id(special.get("pad_token"))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        encoding = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": encoding.ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text: str = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str:
        if self._compiled is None or tokenize:
            raise ValueError("no chat template (or tokenize=True, which is not offered here)")
        return self._compiled.render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **self.special_tokens_map,
        )  # fmt: skip


def load(folder: str | Path) -> LeanTokenizer | None:
    """The tokenizer saved in `folder`, or None when it is not a plain fast tokenizer."""
    root = Path(folder)
    try:
        config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        if (
            config.get("tokenizer_class") not in PLAIN_CLASSES
            or not (root / "tokenizer.json").is_file()
        ):
            return None
        template = config.get("chat_template")
        saved = root / "chat_template.jinja"
        if template is None and saved.is_file():
            template = saved.read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            return None  # named templates (a list): transformers picks among them
        special = {k: _content(config[k]) for k in _SPECIAL if config.get(k) is not None}
        return LeanTokenizer(Tokenizer.from_file(str(root / "tokenizer.json")), special, template)
    except (OSError, ValueError, jinja2.TemplateError):  # (json errors are ValueErrors)
        return None


def _content(token: Any) -> str:
    return str(token["content"]) if isinstance(token, dict) else str(token)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env
