"""Logging set-up: one line per request, and a filter that redacts secrets from every record."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from proxy.errors import Redactor

ACCESS_LOGGER = "proxy.access"
# An access line longer than this is cut (a client-chosen model name may be megabytes long).
ACCESS_LINE_LIMIT = 2000
# Line breaks (every one `str.splitlines` knows) and other non-printable characters: each could
# forge a log line or steer a terminal.
_NON_PRINTABLE = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FORMATTER = logging.Formatter()  # formats exceptions exactly as the handlers' formatters would


def log_safe(text: object, limit: int = 120) -> str:
    """A client-chosen value (a model name, a path) fit for one log line: at most `limit`
    characters of it, control characters and line breaks escaped as Python's repr does."""
    if not isinstance(text, str):
        text = str(text)
    extra = len(text) - limit
    if extra > 0:
        text = text[:limit]
    if not text.isprintable():
        text = repr(text)[1:-1]
    return f"{text}...(+{extra} chars)" if extra > 0 else text


def _escape(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


class RedactingFilter(logging.Filter):
    """Defence in depth: whatever a library logs, configured secrets never reach a log line.

    The message, and the exception and stack text (formatted here and stored in `exc_text`, so
    that no handler formats the exception again unredacted) are redacted. The access log's lines
    stay one line each: line breaks and other control characters escaped, length capped. A record
    with nothing secret-looking costs one `getMessage()` and the Redactor's cheap check.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - arguments that do not fit the template
            # The handler would print the raw template and arguments to stderr: print them redacted.
            message = f"unformattable log record: {record.msg!r} % {record.args!r}"
            record.msg, record.args = message, None
        if record.name == ACCESS_LOGGER:
            cleaned = self._access_line(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        else:
            cleaned = self.redact(message)
            if cleaned is not message and cleaned != message:
                self._rewrite(record, cleaned)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _FORMATTER.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def _access_line(self, message: str) -> str:
        if len(message) > ACCESS_LINE_LIMIT:
            # Redact a little beyond the cut, so that a secret across it is redacted whole.
            window = self.redact(message[: ACCESS_LINE_LIMIT + max(512, self.redact.longest)])
            message = window[:ACCESS_LINE_LIMIT] + f"...(+{len(message) - ACCESS_LINE_LIMIT} chars)"
        else:
            message = self.redact(message)
        if not message.isprintable():
            message = _NON_PRINTABLE.sub(_escape, message)
        return message

    def _rewrite(self, record: logging.LogRecord, cleaned: str) -> None:
        """Keep `args` a tuple when redacting the template and its string arguments one by one gives
        the same line (formatters such as uvicorn's access formatter read `args`); else replace the
        message by its redacted text."""
        args = record.args
        if isinstance(args, tuple) and args and isinstance(record.msg, str):
            msg = self.redact(record.msg)
            parts = tuple(self.redact(a) if isinstance(a, str) else a for a in args)
            try:
                same = msg % parts == cleaned
            except (TypeError, ValueError):
                same = False
            if same:
                record.msg, record.args = msg, parts
                return
        record.msg, record.args = cleaned, None


def configure_logging(level: str, redactor: Redactor) -> None:
    """Log to stderr with timestamps; every handler, ours and uvicorn's, redacts."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flt = RedactingFilter(redactor)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(flt)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RedactingStream:
    """A text stream that redacts what is written to it before passing it on.

    Gradio prints an event's traceback with `traceback.print_exc()`, straight to `sys.stderr`:
    past every logging filter, with the values (an admin key typed in a form) it carried."""

    def __init__(self, stream: TextIO, redactor: Redactor) -> None:
        self._stream = stream
        self._redact = redactor

    def write(self, text: str) -> int:
        self._stream.write(self._redact(text) if isinstance(text, str) else text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def redact_std_streams(redactor: Redactor) -> None:
    """Redact whatever is printed to stdout and stderr (logging handlers already redact)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream, redactor))
