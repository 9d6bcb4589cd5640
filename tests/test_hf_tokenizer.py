"""hf_tokenizer (the local provider's tokenizer without `transformers`) against
AutoTokenizer on SmolLM2's real tokenizer and chat template (the tiny model's files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.providers import hf_tokenizer
from proxy.providers.hf_grammar import Grammars

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": 'Ünïcödé, 日本語, emoji 🙂 and "quotes"\n\ttabs'},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "<|im_start|> is text here"},
    ],
]


def test_the_same_template_ids_and_text_as_autotokenizer(tiny_dir: Path, tokenizer: Any) -> None:
    lean = hf_tokenizer.load(tiny_dir)
    assert lean is not None
    for chat in CHATS:
        for generation in (True, False):
            text = lean.apply_chat_template(chat, add_generation_prompt=generation)
            assert text == tokenizer.apply_chat_template(
                chat, add_generation_prompt=generation, tokenize=False
            )
            for special in (True, False):
                ids = lean(text, add_special_tokens=special)["input_ids"]
                assert ids == tokenizer(text, add_special_tokens=special)["input_ids"]
    ids = list(range(0, 400)) + [tokenizer.eos_token_id, 5000, 20000, 49000]
    for skip in (True, False):
        assert lean.decode(ids, skip_special_tokens=skip) == tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert (lean.eos_token_id, lean.bos_token_id, lean.pad_token_id) == (
        tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
    )  # fmt: skip


def test_constrained_decoding_sees_the_same_vocabulary(tiny_dir: Path, tokenizer: Any) -> None:
    lean = hf_tokenizer.load(tiny_dir)
    assert lean is not None
    ours, theirs = Grammars(lean, 49152), Grammars(tokenizer, 49152)
    assert ours._tokenizer.vocab_size == theirs._tokenizer.vocab_size
    sample = '{"city": "Paris", "n": 3}'
    assert ours._tokenizer.tokenize_str(sample) == theirs._tokenizer.tokenize_str(sample)


def test_anything_but_a_plain_fast_tokenizer_is_left_to_transformers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "other"
    shutil.copytree(tiny_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert hf_tokenizer.load(folder) is None
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{% generation %}x{% endgeneration %}")
    assert hf_tokenizer.load(folder) is None  # transformers' own tag: its way
    (folder / "tokenizer.json").unlink()
    assert hf_tokenizer.load(folder) is None


def test_a_template_that_refuses_raises_a_template_error(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "strict"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"
        "{% for m in messages %}{{ m.content | tojson }}{% endfor %}"
    )
    lean = hf_tokenizer.load(folder)
    assert lean is not None
    assert lean.apply_chat_template([{"role": "user", "content": "é"}]) == '"é"'
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="user first"):
        lean.apply_chat_template([{"role": "system", "content": "x"}])
