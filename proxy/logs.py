"""Logging set-up: one line per request, and a filter that redacts secrets from every record."""

from __future__ import annotations

import logging

from proxy.errors import Redactor


class RedactingFilter(logging.Filter):
    """Defence in depth: whatever a library logs, configured secrets never reach a log line."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure_logging(level: str, redactor: Redactor) -> None:
    """Log to stderr with timestamps; every handler, ours and uvicorn's, redacts."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flt = RedactingFilter(redactor)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(flt)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
