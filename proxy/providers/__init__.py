"""Provider types, one module each, found by the `type` tag of their config (never by name).

A provider module defines `Spec` (its config Struct, a tagged `BaseProviderSpec`),
`Adapter` (the class behind the `Provider` protocol) and `probe(config) -> Probe`.
Modules import lightly (torch loads only when a local model is asked for).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

from ..config import ProviderConfig
from .base import Call, Completion, Op, Probe, Provider

# One line per provider type.
MODULES = ("openai", "ollama", "huggingface", "anthropic")


@functools.cache
def _modules() -> dict[str, ModuleType]:
    found = {}
    for name in MODULES:
        module = importlib.import_module(f".{name}", __name__)
        found[str(module.Spec.__struct_config__.tag)] = module
    return found


def spec_union() -> Any:
    """The tagged union of every provider type's config Struct, for the config's parser."""
    specs = tuple(m.Spec for m in _modules().values())
    union: Any = specs[0]
    for spec in specs[1:]:
        union = union | spec
    return union


def module(config: ProviderConfig) -> ModuleType:
    return _modules()[config.type]


def build(config: ProviderConfig) -> Provider:
    adapter: Provider = module(config).Adapter(config)
    return adapter


async def probe(config: ProviderConfig) -> Probe:
    result: Probe = await module(config).probe(config)
    return result


__all__ = ["Call", "Completion", "Op", "Probe", "Provider", "build", "probe", "spec_union"]
