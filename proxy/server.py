"""Running the app: uvicorn on uvloop + httptools (see bench/ for the comparison)."""

from __future__ import annotations

import logging
import os
import tempfile

import uvicorn

from .config import Config

log = logging.getLogger("omnimind.server")
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def serve(config: Config, host: str, port: int, log_level: str = "info", workers: int = 1) -> None:
    if host not in _LOCAL_HOSTS and not config.api_keys:
        log.warning(
            "binding to %s without server.api_keys: anyone who can reach this port can use "
            "your providers' credentials; set api_keys in %s",
            host, config.path,
        )  # fmt: skip
    log.info(
        "serving %s on http://%s:%d/v1 (config %s, %d worker%s)",
        ", ".join(config.models), host, port, config.path, workers, "s" if workers > 1 else "",
    )  # fmt: skip
    options = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if workers > 1:
        # Each worker loads the same file; Prometheus metrics aggregate across them.
        os.environ["OMNIMIND_CONFIG"] = os.path.abspath(config.path)
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="omnimind-"))
        uvicorn.run("proxy.asgi:create", factory=True, workers=workers, **options)  # type: ignore[arg-type]
        return
    from .app import create_app

    uvicorn.run(create_app(config), **options)  # type: ignore[arg-type]
