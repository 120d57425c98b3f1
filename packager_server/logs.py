"""The server's two logs, and why request data cannot forge lines in them.

* The server log (stderr): one record per event, as text or JSON lines.
* The access log (stdout): one line per request, written by :mod:`packager_server.app`
  (and by the supervisor for the requests it answers for a worker:
  :mod:`packager_server.takeover`), through :func:`log_access`.

Request data reaches logs through request paths and methods, and through exception
messages that quote the input. A newline in it would start a line that looks like a
record of its own (``%0A`` in a path is a newline once decoded), a carriage return or an
ANSI escape would rewrite what a terminal shows. So:

* access log fields go through :func:`printable`, which escapes every control character
  (and the quote and backslash that delimit fields): in both formats, so that a consumer
  decoding the JSON gets the same safe text;
* in the text server log, a record's own newlines (tracebacks, MLflow's multi-line
  warnings) start indented continuation lines, and every other control character is
  escaped: a line that starts at column 0 is always the start of a real record;
* JSON lines need nothing more: ``json.dumps`` escapes every control character.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from packager_server.config import ServerConfig

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators; for fields,
# also the quote and backslash; for log lines, all but the newline (handled apart).
_FIELD_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f\u2028\u2029"\\]')
_LINE_UNSAFE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
CONTINUATION = "\n    "
access_log = logging.getLogger("packager_server.access")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: str) -> str:
    """``value`` with control characters, ``"`` and ``\\`` escaped as ``\\xNN``/``\\uNNNN``."""
    return _FIELD_UNSAFE.sub(_escape, value)


class TextFormatter(logging.Formatter):
    """``asctime level logger: message``; other lines of a record are indented."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _LINE_UNSAFE.sub(_escape, super().format(record)).replace("\n", CONTINUATION)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(config: ServerConfig) -> None:
    """Server logs on stderr; the access log on stdout (one line per request)."""
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(JsonFormatter() if config.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [errors]
    root.setLevel(logging.DEBUG if config.debug else logging.INFO)
    for noisy in ("mlflow", "uvicorn", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    access = logging.getLogger("packager_server.access")
    access.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [handler]
    access.setLevel(logging.INFO)


def log_access(
    log_format: str,
    *,
    client: str,
    method: str,
    path: str,
    status: int,
    seconds: float,
    size: int,
    request_id: str,
    worker: int,
    route: str = "-",
    score_seconds: float | None = None,
    model_seconds: float | None = None,
) -> None:
    """One access log line, as text or JSON."""
    # Every field through printable(): a path can hold any character once decoded
    # (%0A is a newline), and must not forge a line or drive a terminal.
    client, method = printable(client), printable(method)
    path, request_id = printable(path[:200]), printable(request_id)
    if log_format == "json":
        access_log.info(
            json.dumps(
                {
                    "ts": time.time(),
                    "client": client,
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "bytes": size,
                    "request_id": request_id,
                    "route": route,
                    "score_ms": _milliseconds(score_seconds),
                    "model_ms": _milliseconds(model_seconds),
                    "worker": worker,
                }
            )
        )
    else:
        access_log.info(
            '%s "%s %s" %d %.2fms %dB id=%s route=%s worker=%d',
            client,
            method,
            path,
            status,
            seconds * 1000,
            size,
            request_id,
            route,
            worker,
        )


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
