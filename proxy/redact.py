"""Secrets never leave the process: one `Redactor` masks every configured credential.

The secrets are every provider's `api_key`, every value of every provider's `headers`
(custom key headers such as `x-api-key`, `api-key`, `Authorization`) and the gateway's own
`api_keys`. Each is also matched in the forms an upstream is likely to echo it in: the
token after an auth scheme (`Bearer <token>`), URL-encoded, JSON-escaped and base64 of
`user:secret`. All forms are searched with one compiled regex, longest first.

Control characters in text that goes to the text log are escaped (`\\n` -> `\\\\n`), so a
newline in an upstream's error cannot forge a log line (`escape_controls`, `LogFilter`).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

from .config import Config

MASK = "********"
_ENCODED_MIN = 8
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\x{ord(char):02x}"


def escape_controls(text: str) -> str:
    """`text` with control characters written as escapes: one log record stays one line."""
    return _CONTROLS.sub(_escape_one, text)


def secret_values(config: Config) -> list[str]:
    """Every credential the config holds, as configured (expanded from the environment):
    providers' api_keys and header values, and the gateway's own keys."""
    return config.secrets()


def _forms(secret: str) -> set[str]:
    """The secret and the encodings an upstream's error text may carry it in."""
    forms = {secret, json.dumps(secret)[1:-1]}
    scheme, _, token = secret.partition(" ")
    if token.strip() and scheme.isalpha():  # "Bearer sk-..." / "Basic dXNl...": the token too
        forms |= _forms(token.strip())
    if len(secret) >= _ENCODED_MIN:  # encodings of short values would mask unrelated text
        forms.add(urllib.parse.quote(secret, safe=""))
        for plain in (secret, f"{secret}:", f":{secret}"):  # as is, and as basic auth
            forms.add(base64.b64encode(plain.encode()).decode().rstrip("="))
    return {f for f in forms if f}


class Redactor:
    """Masks every configured secret in text, bytes and decoded JSON; cheap when none match."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= _forms(secret)
        self.count = len(forms)
        ordered = sorted(forms, key=lambda f: (-len(f), f))  # longest first: no partial leaks
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._bytes_pattern = (
            re.compile(b"|".join(re.escape(f.encode()) for f in ordered)) if ordered else None
        )

    @classmethod
    def from_config(cls, config: Config) -> Redactor:
        return cls(secret_values(config))

    def __bool__(self) -> bool:
        return self._pattern is not None

    def text(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self.text(text)

    def bytes(self, data: bytes) -> bytes:
        if self._bytes_pattern is None or not data:
            return data
        return self._bytes_pattern.sub(MASK.encode(), data)

    def obj(self, value: Any) -> Any:
        """A copy of decoded JSON (dicts, lists, strings; keys too) with secrets masked."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.obj(k): self.obj(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.obj(v) for v in value]
        return value

    def log_text(self, text: str) -> str:
        """For the text log: secrets masked, control characters escaped."""
        return escape_controls(self.text(text))

    def filter(self) -> LogFilter:
        return LogFilter(self)


class LogFilter(logging.Filter):
    """Masks secrets in a record's message, arguments and traceback, and escapes control
    characters in its message. Attach it to handlers or loggers (`install`); `redactor`
    may be swapped on a config reload."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_omnimind_clean", None) is self.redactor:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record still gets logged, masked
            message = f"{record.msg!r} {record.args!r}"
        record.msg = self.redactor.log_text(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.redactor.text(text)
        if record.stack_info:
            record.stack_info = self.redactor.text(record.stack_info)
        record._omnimind_clean = self.redactor
        return True


# Loggers whose records may carry upstream text: ours, and the server's error logger
# (it logs tracebacks of exceptions that escape an ASGI app).
LOGGER_PREFIXES = ("omnimind", "uvicorn.error", "litestar")


def install(log_filter: LogFilter) -> None:
    """Attach the filter to every handler of the root logger and to our loggers.

    Handlers catch records propagated from any logger; logger-level filters catch records
    handled by a handler added to that logger later. Both are idempotent per record.
    """
    for handler in logging.getLogger().handlers:
        handler.addFilter(log_filter)
    for logger in _loggers():
        logger.addFilter(log_filter)


def uninstall(log_filter: LogFilter) -> None:
    for handler in logging.getLogger().handlers:
        handler.removeFilter(log_filter)
    for logger in _loggers():
        logger.removeFilter(log_filter)


def _loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n.startswith(LOGGER_PREFIXES)]
    names += [p for p in LOGGER_PREFIXES if p not in names]
    return [logging.getLogger(n) for n in names]
