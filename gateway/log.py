"""Logging: one line (or one JSON object) per event on stderr, never a secret.

Code logs through stdlib loggers under ``popgate.*`` and passes context as
``extra={"session": ..., "user": ..., "device": ..., "peer": ...}``; the formatters append it as
``key=value`` (text) or as JSON members. Twisted's own log is routed into the same handler, so
nothing reaches stderr unformatted.

Credentials must simply never be passed to a logger; RedactingFilter is the second line of
defence for extras whose name says they are secret.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

from gateway.config import REDACTED, LogSettings

__all__ = [
    "CONTEXT_FIELDS",
    "JSONFormatter",
    "RedactingFilter",
    "TextFormatter",
    "setup_logging",
]

#: Context fields, printed in this order before any other extra.
CONTEXT_FIELDS = ("session", "user", "device", "peer")

ROOT_LOGGER = "popgate"
TWISTED_LOGGER = "popgate.twisted"

_SENSITIVE_NAME = re.compile(r"pass|secret|token|credential|auth_?data", re.IGNORECASE)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}

# Control characters would let a peer-supplied string (a login name, a command) forge extra
# log lines or terminal escapes; they are shown escaped instead.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES}
    ordered = {k: fields.pop(k) for k in CONTEXT_FIELDS if fields.get(k) is not None}
    ordered.update((k, v) for k, v in fields.items() if not k.startswith("_") and v is not None)
    return ordered


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


def _one_line(text: str) -> str:
    return text.translate(_CONTROL)


def _text_value(value: object) -> str:
    text = str(value)
    if text and not any(c.isspace() or c in '"=\\' or not c.isprintable() for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class RedactingFilter(logging.Filter):
    """Replace extras named like a secret (``password``, ``master_secret``…) by ``<redacted>``."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in list(vars(record)):
            if name not in _STANDARD_ATTRIBUTES and _SENSITIVE_NAME.search(name):
                setattr(record, name, REDACTED)
        return True


class TextFormatter(logging.Formatter):
    """``2026-11-23T06:00:00Z INFO popgate.pop3 message session=abc user=alice``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record.created),
            record.levelname,
            record.name,
            _one_line(record.getMessage()),
        ]
        parts.extend(f"{key}={_text_value(value)}" for key, value in _extras(record).items())
        if record.exc_info:
            # A traceback stays on the event's one line, escaped, so lines stay events.
            parts.append(f"exc={_text_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    """One JSON object per event: ``ts``, ``level``, ``logger``, ``msg`` and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            event[f"extra_{key}" if key in event else key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False, default=str)


_installed_handler: logging.Handler | None = None
_twisted_routed = False


def setup_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Send all logging to ``stream`` (stderr by default) in the configured format.

    Safe to call again (serve sets it up before the app; tests reconfigure): the previous
    handler is replaced. Other libraries' loggers only pass warnings and errors: aiosmtpd logs
    protocol lines, AUTH included, at debug level.
    """
    global _installed_handler
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JSONFormatter() if settings.format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())

    root = logging.getLogger()
    if _installed_handler is not None:
        root.removeHandler(_installed_handler)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    _installed_handler = handler

    level = logging.getLevelName(settings.level.upper())
    logging.getLogger(ROOT_LOGGER).setLevel(level)
    # Twisted says "Starting factory" for every outgoing connection at info level.
    twisted_level = level if level == logging.DEBUG else max(level, logging.WARNING)
    logging.getLogger(TWISTED_LOGGER).setLevel(twisted_level)
    _route_twisted_logs()


def _route_twisted_logs() -> None:
    """Feed twisted.logger (and thus twisted.python.log) into stdlib logging, once per process.

    Twisted warns when its global log is begun twice, so a second setup_logging only swaps the
    stdlib handler. Standard I/O is not redirected: check-config prints to stdout.
    """
    global _twisted_routed
    if _twisted_routed:
        return
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo(
        [STDLibLogObserver(name=TWISTED_LOGGER)], redirectStandardIO=False
    )
    _twisted_routed = True
