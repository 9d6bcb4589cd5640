"""The server's own log lines: one format for ours and uvicorn's, on stderr.

`text` (the default) is for people: `2026-11-25 17:40:01 WARNING omnimind.chain: ...`.
`json` is one object per line for machines: time, level, logger, message, any `extra=`
fields, and a traceback as one `error` string. The audit log (one JSON line per request,
observe.py) is separate and unchanged.

`dict_config()` is a `logging.config.dictConfig` dict, so uvicorn applies the same setup in
each `--workers` process (it is passed as uvicorn's `log_config`). Progress bars (tqdm from
transformers, huggingface_hub or gguf) are switched off: they are not log lines.
`ProviderStates` logs a provider going down and coming back once per transition.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Set before transformers/tqdm are imported (both read them at import).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",  # "loading weights" chatter; our own lines say it once
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
# Attributes every LogRecord has: anything else came from `extra=` and goes into JSON lines
# (but not uvicorn's copy of its message with terminal colours).
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "color_message",
}  # fmt: skip
# uvicorn's loggers: emptied and propagating, so our handler formats their lines too.
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _name(record: logging.LogRecord) -> str:
    """uvicorn logs its own start/stop lines as "uvicorn.error": call it uvicorn."""
    return "uvicorn" if record.name == "uvicorn.error" else record.name


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.name = _name(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines inside a message stay escaped inside its string."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": _name(record),
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_") and key not in line:
                line[key] = value
        if record.exc_info:
            line["error"] = record.exc_text or self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


def dict_config(fmt: str = "text", level: str = "info") -> dict[str, Any]:
    """The whole logging setup as a dictConfig dict (picklable: uvicorn's workers apply it)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"omnimind": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "omnimind",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in _UVICORN},
    }


def quiet_progress_bars() -> None:
    """No progress bars from the libraries that load local models (unless asked for)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def configure(fmt: str = "text", level: str = "info") -> dict[str, Any]:
    """Apply the setup in this process; returns the dict to hand uvicorn as `log_config`."""
    quiet_progress_bars()
    config = dict_config(fmt, level)
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    return config


class ProviderStates:
    """Logs a provider going down (circuit open) and coming back (circuit closed), once each.

    Call `observe(name, state, why)` with the breaker's state after any attempt (cheap: one
    dict lookup when nothing changed); "open" and "half_open" are down, "closed" is up.
    Repeated failures while down, and a failed half-open probe, log nothing more.
    """

    __slots__ = ("_down", "_log")

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._down: dict[str, str] = {}
        self._log = logger or logging.getLogger("omnimind.providers")

    @property
    def all_up(self) -> bool:
        return not self._down

    def is_down(self, provider: str) -> bool:
        return provider in self._down

    def down(self, provider: str, why: str = "", retry_in: float | None = None) -> bool:
        """Log it as down unless it already is; True when this call logged."""
        if provider in self._down:
            return False
        self._down[provider] = why
        retry = f", next try in {retry_in:.0f} s" if retry_in else ""
        self._log.warning(
            "provider %s down (circuit open%s)%s",
            provider, retry, f": {why}" if why else "",
            extra={"provider": provider, "circuit": "open"},
        )  # fmt: skip
        return True

    def back(self, provider: str) -> bool:
        """Log it as back if it was down; True when this call logged."""
        if self._down.pop(provider, None) is None:
            return False
        self._log.info(
            "provider %s back (circuit closed)",
            provider,
            extra={"provider": provider, "circuit": "closed"},
        )
        return True

    def observe(self, provider: str, state: str, why: str = "") -> None:
        if state == "closed":
            if provider in self._down:
                self.back(provider)
        elif provider not in self._down:
            self.down(provider, why)
