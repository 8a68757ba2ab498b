"""Log formats (text, the default, and JSON lines) and the redaction of secrets.

Text: ``2026-11-22 10:49:02,708 INFO nurseryd.jobs: job 12 sleep completed in 4.0 s: ...``.

JSON (``log_format = "json"``): one object per line, for journald or Loki::

    {"timestamp": "2026-11-22T10:49:02.708+00:00", "level": "INFO",
     "logger": "nurseryd.jobs", "message": "job 12 sleep completed in 4.0 s: ...",
     "job_id": 12, "kind": "sleep", "event": "complete", "status": "completed", ...}

The structured fields are what the call passed as ``extra=``.

Both formats pass every line through :func:`redact` last, so no secret reaches
a log whoever wrote the message: the userinfo of every URL
(``postgresql://***@db/app``), and the values of parameters whose names look
secret (``?api_key=***``, ``token=***``, ``X-Amz-Signature=***``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Hypercorn's access log line (when ``access_log`` is on): client, request line
#: (the query string too, redacted), status, response bytes, seconds.
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(Uq)s HTTP/%(H)s" %(s)s %(b)s %(L)ss'

# Bounded repetitions: a long blob in an error message costs linear time, never more.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://)[^\s/?#@]{1,500}@")
_SECRET_NAMES = "key|token|password|passwd|pwd|secret|signature|sig|credential|auth"
_SECRET_PARAM = re.compile(
    rf"(?P<name>\b[\w.\-]{{0,40}}(?:{_SECRET_NAMES})[\w.\-]{{0,40}}=)(?P<value>[^\s&#\"',;)]+)",
    re.IGNORECASE)
REDACTED = "***"

#: Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    """``text`` with URL userinfo and secret-looking parameter values replaced."""
    text = _USERINFO.sub(lambda match: f"{match['scheme']}{REDACTED}@", text)
    return _SECRET_PARAM.sub(lambda match: f"{match['name']}{REDACTED}", text)


class TextFormatter(logging.Formatter):
    """The classic one-line format, redacted."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and not name.startswith("_") and name not in out:
                out[name] = _plain(value)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=lambda value: redact(str(value)))


def _plain(value: Any) -> Any:
    """A field value as JSON: strings redacted, odd objects as their redacted text."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    return redact(str(value))


def formatter_for(log_format: str) -> logging.Formatter:
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_logging(level: str, log_format: str = "text", *, access_log: bool = False,
                      stream: IO[str] | None = None) -> logging.Handler:
    """The process's one log handler (stderr), in ``log_format``; returns it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
    logging.getLogger("hypercorn.access").setLevel(logging.INFO if access_log
                                                   else logging.WARNING)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # httpx logs every request URL at INFO; a URL may carry a key or a password.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Warnings become log records, so a JSON log stays one object per line.
    logging.captureWarnings(True)
    return handler
