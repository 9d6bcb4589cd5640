"""OmniMind Gateway: an OpenAI-compatible LLM gateway with ordered provider chains.

The Python API (the seed's router) is exported here and imported on first use, so that
`import proxy` (and every `proxy.*` module import) stays light:

    from proxy import get_llm_router, invoke_llm_sync, LLMModelTier
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "LLMError",
    "LLMModelTier",
    "LLMProvider",
    "LLMResponse",
    "LLMRouter",
    "__version__",
    "get_llm_router",
    "invoke_llm_sync",
]

if TYPE_CHECKING:
    from .router import (
        LLMError,
        LLMModelTier,
        LLMProvider,
        LLMResponse,
        LLMRouter,
        get_llm_router,
        invoke_llm_sync,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".router", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
