"""Running the app: uvicorn on uvloop + httptools (see bench/ for the comparison)."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .config import Config

log = logging.getLogger("omnimind.server")


def serve(config: Config, host: str, port: int, log_level: str = "info") -> None:
    app = create_app(config)
    aliases = ", ".join(config.models)
    log.info("serving %s on http://%s:%d/v1 (config %s)", aliases, host, port, config.path)
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
