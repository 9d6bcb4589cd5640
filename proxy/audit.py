"""The audit log: one JSON line per request, written off the event loop.

`server.audit_log` is stdout, stderr, a file path, or off. A request only appends its
line to a bounded buffer (`server.audit_buffer` lines); a writer thread writes what has
gathered every `FLUSH_AFTER` seconds. A slow reader (a stdout pipe nobody drains) can
never stall the gateway: once the buffer is full, lines are dropped and counted
(`dropped`, exported as `omnimind_audit_dropped_lines`).

Strings a client controls (alias, error text, ids) are cut to `MAX_FIELD` characters, and
every string that did not come from the config (alias, error text, message content) is
passed through the redactor: no configured secret is ever written.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from typing import Any, BinaryIO

import msgspec

from .errors import Attempt
from .redact import Redactor

log = logging.getLogger("omnimind.audit")

MAX_FIELD = 256


class AuditLine(msgspec.Struct, omit_defaults=True):
    ts: float
    request_id: str
    alias: str
    stream: bool
    status: int
    outcome: str
    attempts: list[dict[str, Any]]
    duration_ms: float
    queue_ms: float = 0.0
    provider: str | None = None
    model: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    key_id: str | None = None
    error: str | None = None
    messages: Any = None


_encode = msgspec.json.Encoder().encode


def cut(text: str, limit: int = MAX_FIELD) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def attempt_fields(attempts: list[Attempt]) -> list[dict[str, Any]]:
    return [
        {
            "provider": a.provider,
            "model": cut(a.model),
            "reason": str(a.reason),
            "status": a.status,
            "latency_ms": round(a.latency_ms, 1),
        }
        for a in attempts
    ]


def open_target(target: str | bool) -> tuple[str, BinaryIO | None]:
    """The normalised target and its file; OSError if a path cannot be opened."""
    if isinstance(target, bool):
        target = "stdout" if target else "off"
    if target in ("off", ""):
        return target, None
    if target in ("stdout", "stderr"):
        return target, getattr(sys, target).buffer
    return target, open(target, "ab")  # noqa: SIM115 - closed by the writer


class AuditLog:
    """JSON lines to a target, through a bounded buffer and a writer thread."""

    FLUSH_AFTER = 0.05

    def __init__(self, target: str | bool, buffer: int = 10000) -> None:
        self.target, self._file = open_target(target)
        self.capacity = buffer
        self.dropped = 0
        self._lines: collections.deque[bytes] = collections.deque()
        self._queued = 0  # lines accepted so far (the caller's thread counts them)...
        self._handled = 0  # ...and lines written or lost since (the writer's thread)
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        if self._file is not None:
            self._thread = threading.Thread(target=self._run, name="omnimind-audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, line: bytes) -> None:
        """Queue a line; never blocks. A full buffer drops the line and counts it."""
        if self._file is None:
            return
        if len(self._lines) >= self.capacity:
            self.dropped += 1
            return
        self._lines.append(line)
        self._queued += 1
        if not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._drain()
            if self._closing:
                return
            time.sleep(self.FLUSH_AFTER)  # lines gather meanwhile: one write for many

    def _drain(self) -> None:
        lines = []
        popleft = self._lines.popleft
        while self._lines:
            lines.append(popleft())
        if not lines or self._file is None:
            return
        try:
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            self.dropped += len(lines)
            log.error("audit log write failed (%d lines lost): %s", len(lines), exc)
        finally:
            self._handled += len(lines)

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (a bounded time) until the lines queued so far are written. Not until the
        buffer is empty: the writer empties it before its write, which is what counts."""
        deadline = time.monotonic() + timeout
        queued = self._queued
        self._wake.set()
        while self._handled < queued and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (within `timeout`: a stuck reader cannot hold shutdown)."""
        if self._thread is not None:
            self._closing = True
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None
        file, self._file = self._file, None
        if file is not None and self.target not in ("stdout", "stderr"):
            try:
                file.close()
            except OSError as exc:  # a reader that went away: nothing left to tell it
                log.warning("audit log close failed: %s", exc)


def audit_json(rec: Any, log_content: bool, redactor: Redactor) -> bytes:
    """One audit line for a `RequestRecord`, client strings cut, secrets masked."""
    line = AuditLine(
        ts=round(time.time(), 3),
        request_id=cut(rec.request_id, 128),
        alias=redactor.text(cut(rec.alias)),
        stream=rec.stream,
        status=rec.status,
        outcome=rec.outcome,
        attempts=attempt_fields(rec.attempts),
        duration_ms=round(rec.duration_ms, 1),
        queue_ms=round(rec.queue_ms, 1),
        provider=rec.provider or None,
        model=cut(rec.model) if rec.model else None,
        latency_ms=round(rec.latency_ms, 1) if rec.provider else None,
        prompt_tokens=rec.prompt_tokens,
        completion_tokens=rec.completion_tokens,
        cost_usd=rec.cost_usd,
        key_id=rec.key_id or None,
        error=redactor.text(cut(rec.error)) if rec.error else None,
        messages=redactor.obj(rec.messages) if log_content else None,
    )
    return _encode(line)
