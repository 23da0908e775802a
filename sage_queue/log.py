"""Logging: the library is quiet unless told otherwise; the command line can say so, as text or JSON lines.

The library logs through the standard :mod:`logging` module, under the ``sage_queue``
logger (``sage_queue.job``, ``sage_queue.monitor``, ``sage_queue.rpc.server``...). ``import
sage_queue`` puts a :class:`logging.NullHandler` on that logger (and so does importing this
module, for code that imports a submodule alone), as the logging HOWTO asks of libraries:
without any handler configured, a warning would otherwise reach stderr through logging's
"last resort" handler. An application decides what is shown, either with its own
logging configuration or with :func:`configure_logging`; the ``sage-queue`` command calls it
for its global options ``--log-level LEVEL`` and ``--log-json``.

``import sage_queue`` does not import this module (only :mod:`logging`, ~5 ms): it stays light.
"""

from __future__ import annotations

import datetime
import json as _json
import logging
import sys
from typing import Any, Optional, TextIO

__all__ = ["JsonLinesFormatter", "configure_logging", "get_logger", "LOGGER_NAME"]

LOGGER_NAME = "sage_queue"

_library_logger = logging.getLogger(LOGGER_NAME)
if not any(isinstance(h, logging.NullHandler) for h in _library_logger.handlers):
    _library_logger.addHandler(logging.NullHandler())

# Attributes every LogRecord has: anything else on a record came from ``extra=`` and is written out.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_OURS = "_sage_queue_configured"
"""Marks the handler :func:`configure_logging` installed, so that a second call replaces it."""


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (under ``sage_queue``), with the library's NullHandler in place."""
    return logging.getLogger(name)


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: ``{"ts", "level", "logger", "msg", ...}``.

    ``ts`` is ISO 8601 UTC with milliseconds; fields given with ``extra={...}`` follow
    (values that JSON cannot hold are written as their ``str``); ``exc`` holds the
    traceback of a record logged with ``exc_info``, ``stack`` its stack.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "WARNING", json: bool = False, *, stream: Optional[TextIO] = None
) -> logging.Handler:
    """Show the library's records of ``level`` and above on ``stream`` (default: stderr); return the handler.

    ``json=True`` writes one JSON object per line (:class:`JsonLinesFormatter`), else one text
    line ``time LEVEL logger: message``. Only the ``sage_queue`` logger is configured (the
    root logger is left to the application) and it stops propagating, so that a record is not
    written twice. A second call replaces the handler of the first. ValueError for an unknown level.
    """
    name = level.upper() if isinstance(level, str) else level
    if not isinstance(name, str) or not isinstance(logging.getLevelName(name), int):
        raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if getattr(h, _OURS, False)]:
        logger.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        JsonLinesFormatter() if json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    setattr(handler, _OURS, True)
    logger.addHandler(handler)
    logger.setLevel(name)
    logger.propagate = False
    return handler
