"""Local inference with `transformers`: a chain entry's `model` names the weights.

Weights. `entry.model` is a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"; HF_TOKEN or
HUGGING_FACE_HUB_TOKEN is passed for gated models), a local directory (absolute, relative
or `~`), or `package:<python_pkg>`: the folder of an installed Python package that holds
the files. `entry.gguf_file` names a GGUF file in that folder.

This module is the provider's config, probe and entry point; it imports nothing heavy.
The adapter (`hf_provider.py`, with torch and transformers) is imported when a config
asks for a local model, so a gateway without the `local` extra still reads any config
(the provider is then `unavailable`, with the install hint).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ..config import BaseProviderSpec, PositiveFloat, PositiveInt, ProviderConfig
from .base import Probe


class Spec(BaseProviderSpec, tag="huggingface"):
    """Local `transformers` inference; each entry's `model` names the weights."""

    device: str = "auto"
    dtype: str = "auto"
    preload: bool = False
    max_new_tokens: PositiveInt = 512
    timeout: PositiveFloat = 300.0
    first_token_timeout: PositiveFloat = 120.0
    max_concurrency: PositiveInt | None = 1
    max_batch: PositiveInt = 1  # rows decoded together; a request joins at the next step
    quantize: Literal["auto", "int8", "none"] = "auto"  # auto: int8 matmuls on the CPU
    compile: bool | str = "auto"  # auto, on, off: the steps, in the background (hf_compile)
    loads_gguf: ClassVar[bool] = True

    @property
    def compile_mode(self) -> str:
        """`compile` as hf_compile says it: YAML reads `on`/`off` as true/false."""
        return self.compile if isinstance(self.compile, str) else "on" if self.compile else "off"

    def problem(self) -> tuple[str, str] | None:
        if self.compile_mode not in ("auto", "on", "off"):
            return "compile", f"{self.compile!r} is not one of auto, on, off (or true, false)"
        if (self.max_concurrency or self.max_batch) < self.max_batch:
            return "max_batch", (
                f"{self.max_batch} is more than max_concurrency ({self.max_concurrency}), so "
                "no batch could fill; raise max_concurrency to at least max_batch"
            )
        return None


def Adapter(config: ProviderConfig) -> Any:  # noqa: N802 - the registry's constructor name
    from .hf_adapter import LocalAdapter  # torch: only when a config asks for it
    from .hf_provider import HuggingFaceProvider

    return LocalAdapter(HuggingFaceProvider(config), config)


async def probe(config: ProviderConfig) -> Probe:
    return Probe(True, "local", None)  # the weights are checked per entry
