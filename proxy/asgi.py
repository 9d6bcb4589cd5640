"""ASGI entry point for process managers and `serve --workers N`.

uvicorn --factory proxy.asgi:create      (config from $OMNIMIND_CONFIG or ./models.yaml)
"""

from __future__ import annotations

from .app import create_app
from .config import default_path, load
from .pipeline import Pipeline


def create() -> Pipeline:
    return create_app(load(default_path()))
