"""Running the app: uvicorn on uvloop + httptools (see bench/ for the comparison)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any

import uvicorn

from . import httpproto, logs
from .config import Config, ServerSpec

log = logging.getLogger("omnimind.server")
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class CannotListen(Exception):
    """The address cannot be served (port taken, no permission); the message says what to do."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"
    shutdown_grace: float = 10.0  # seconds in-flight requests get after SIGINT/SIGTERM


def check_port(host: str, port: int) -> None:
    """Raise CannotListen, naming the port and the fix, if (host, port) cannot be bound now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}: {exc.strerror}") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL and len(infos) > 1:
                    continue  # e.g. "localhost" without IPv6: asyncio skips it too
                raise CannotListen(_why(host, port, exc)) from None


def _why(host: str, port: int, exc: OSError) -> str:
    other = 8001 if port != 8001 else 8002
    fix = f'pick another port: --port {other} (make serve ARGS="--port {other}")'
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another gateway?); stop it or {fix}"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} on {host}; {fix}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine; use --host 127.0.0.1 or 0.0.0.0"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


class WorkerProtocol:
    """The bounded HTTP protocol for `serve --workers N`.

    uvicorn pickles its config into each worker process, and the protocol class that
    httpproto makes at run time (it carries the limits) does not pickle: this does, and
    builds that class once in each worker from the server settings.
    """

    __slots__ = ("server", "_protocol")

    def __init__(self, server: ServerSpec) -> None:
        self.server = server
        self._protocol: Any = None

    def __reduce__(self) -> tuple[type[WorkerProtocol], tuple[ServerSpec]]:
        return (WorkerProtocol, (self.server,))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._protocol is None:
            self._protocol = httpproto.uvicorn_options(self.server)["http"]
        return self._protocol(*args, **kwargs)


def uvicorn_options(
    config: Config, opts: ServeOptions, log_config: dict[str, Any]
) -> dict[str, Any]:
    options = {
        "host": opts.host,
        "port": opts.port,
        "loop": "uvloop",
        "log_level": opts.log_level,
        # proxy/logs.py's setup, applied by uvicorn in each worker process; this process has it
        # already (applying it again would drop filters added since, e.g. redaction's)
        "log_config": log_config if opts.workers > 1 else None,
        "access_log": False,  # the audit log has one line per request
        "timeout_graceful_shutdown": opts.shutdown_grace,
        # httptools with bounded heads and slow-client timeouts, keep-alive, connection cap
        **httpproto.uvicorn_options(config.server),
    }
    if opts.workers > 1:
        options["http"] = WorkerProtocol(config.server)
    return options


def serve(config: Config, opts: ServeOptions) -> None:
    """Serve until SIGINT/SIGTERM; raises CannotListen before starting if the port is taken."""
    log_config = logs.configure(opts.log_format, opts.log_level)
    check_port(opts.host, opts.port)
    if opts.host not in _LOCAL_HOSTS and not config.api_keys:
        log.warning(
            "binding to %s without server.api_keys: anyone who can reach this port can use "
            "your providers' credentials; set api_keys in %s",
            opts.host, config.path,
        )  # fmt: skip
    workers = max(1, opts.workers)
    log.info(
        "serving %s on http://%s:%d/v1 (config %s, %d worker%s)",
        ", ".join(config.models), opts.host, opts.port, config.path, workers,
        "s" if workers > 1 else "",
    )  # fmt: skip
    options = uvicorn_options(config, opts, log_config)
    if workers > 1:
        # Each worker loads the same file; Prometheus metrics aggregate across them.
        os.environ["OMNIMIND_CONFIG"] = os.path.abspath(config.path)
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="omnimind-"))
        uvicorn.run("proxy.asgi:create", factory=True, workers=workers, **options)
        return
    from .app import create_app

    uvicorn.run(create_app(config), **options)
