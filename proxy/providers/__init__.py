"""Provider adapters, one module each, built from config by spec type (never by name)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..config import HuggingFaceSpec, OllamaSpec, OpenAISpec, ProviderConfig
from .base import Call, Completion, Provider

# Spec type -> "module:Class". Imported on use, so torch loads only if a config asks for it.
_ADAPTERS: dict[type, str] = {
    OpenAISpec: "openai:OpenAIProvider",
    OllamaSpec: "ollama:OllamaProvider",
    HuggingFaceSpec: "huggingface:HuggingFaceProvider",
}


def build(config: ProviderConfig) -> Provider:
    module, _, cls = _ADAPTERS[type(config.spec)].partition(":")
    factory: Callable[[ProviderConfig], Provider] = getattr(
        importlib.import_module(f".{module}", __name__), cls
    )
    return factory(config)


__all__ = ["Call", "Completion", "Provider", "build"]
