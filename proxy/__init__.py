"""OmniMind Gateway: an OpenAI-compatible LLM gateway with ordered provider chains."""

__version__ = "0.1.0"
