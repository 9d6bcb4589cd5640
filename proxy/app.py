"""The gateway's HTTP surface: the route table. A new route is a handler and one line here.

Every route goes through the one pipeline (`pipeline.py`): request ids, edge checks,
auth and rate limits, body limits, and errors rendered in the route's API shape.
"""

from __future__ import annotations

from . import completions, embeddings, routes_chat, routes_info, routes_messages, routes_responses
from .config import Config
from .gateway import Gateway
from .pipeline import Pipeline, Route
from .render import AnthropicDialect

ROUTES: list[Route] = [
    Route("/v1/chat/completions", routes_chat.chat, admits=True),
    Route("/v1/completions", completions.route, admits=True),
    Route("/v1/embeddings", embeddings.route, admits=True),
    Route("/v1/responses", routes_responses.create),
    Route("/v1/messages", routes_messages.create, dialect=AnthropicDialect()),
    Route("/v1/messages/count_tokens", routes_messages.count_tokens, dialect=AnthropicDialect()),
    Route("/v1/models", routes_info.list_models, "GET"),
    Route("/v1/models/", routes_info.get_model, "GET", prefix=True),
    Route("/v1/providers", routes_info.providers, "GET"),
    Route("/v1/stats", routes_info.stats, "GET"),
    Route("/metrics", routes_info.metrics, "GET", auth=False),
    Route("/health", routes_info.health, "GET", auth=False),
    Route("/health/ready", routes_info.ready, "GET", auth=False),
]


def create_app(config: Config) -> Pipeline:
    """The ASGI app serving `config` (reloaded live when its file changes)."""
    return Pipeline(Gateway(config), ROUTES)
