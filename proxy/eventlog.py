"""The event log (EVENT_LOGGING=true): one database row per proxy request, never prompt text.

Rows are buffered and written in one transaction every FLUSH_EVERY_S (and before every read and
at shutdown): a row per commit cost ~70 µs of CPU per request, a quarter of the proxy's own. A
killed process loses at most that last second of rows; no request depends on them.

A row holds the time, who asked (a user token's hash, or a salted hash of the address), the
service and model, the status, tokens, latency and queue time when known. Rows older than
EVENT_LOG_DAYS are pruned. Statistics export as CSV or a Markdown table, optionally anonymised.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from proxy.access.gatekeeper import hashed
from proxy.access.ratelimit import network_of

log = logging.getLogger("proxy.events")

MAX_EVENTS_PAGE = 1000
FLUSH_EVERY_S = 1.0
MAX_PENDING = 10_000  # rows waiting for a flush; beyond it a flush happens at once
_SCHEMA = """
CREATE TABLE IF NOT EXISTS owner_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    subject TEXT NOT NULL,          -- 'h:' + token hash, or 'ip:' + salted address hash
    service TEXT NOT NULL,
    model TEXT NOT NULL,
    family TEXT NOT NULL,
    status INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    queue_ms REAL,
    streamed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_subject_time ON events (subject, time);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
"""
_COLUMNS = "time, subject, service, model, family, status, tokens_in, tokens_out, latency_ms, queue_ms, streamed"
STATS_HEADERS = ["user", "family", "requests", "served", "refused_or_failed", "tokens_in", "tokens_out"]


@dataclass(slots=True)
class Event:
    time: float
    subject: str
    service: str
    model: str
    family: str
    status: int
    tokens_in: int
    tokens_out: int
    latency_ms: float
    queue_ms: float | None
    streamed: bool


class EventLog:
    """Rows in the store's `events` table; every method is a short statement under the store's lock."""

    def __init__(self, store: Any, keep_days: int, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.keep_days = keep_days
        self.clock = clock
        store.execute(_SCHEMA, None)
        self._salt = self._address_salt()
        self._pending: list[tuple] = []

    def _address_salt(self) -> str:
        """A per-installation secret, so that address hashes cannot be reversed by trying addresses."""
        rows = self.store.query("SELECT value FROM owner_settings WHERE name = 'event_salt'")
        if rows:
            return rows[0][0]
        salt = secrets.token_hex(16)
        self.store.execute("INSERT OR REPLACE INTO owner_settings (name, value) VALUES ('event_salt', ?)", (salt,))
        return salt

    def subject(self, user_token: str | None, ip: str) -> str:
        if user_token:
            return hashed(user_token)
        digest = hashlib.sha256(f"{self._salt}:{network_of(ip)}".encode()).hexdigest()[:10]
        return "ip:" + digest

    def record(self, event: Event) -> None:
        self._pending.append(
            (
                event.time, event.subject, event.service, event.model[:200], event.family[:100], event.status,
                event.tokens_in, event.tokens_out, event.latency_ms, event.queue_ms, int(event.streamed),
            )  # fmt: skip
        )
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> int:
        """Write the buffered rows; returns how many."""
        rows, self._pending = self._pending, []
        if not rows:
            return 0
        try:
            self.store.execute_many(f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except Exception:  # a full disk must not fail the requests being answered
            log.exception("could not write %d event rows", len(rows))
            return 0
        return len(rows)

    def recent(self, subject: str | None, limit: int) -> list[dict]:
        """Newest first; `subject` None means every caller."""
        self.flush()
        limit = max(1, min(int(limit), MAX_EVENTS_PAGE))
        where, params = ("WHERE subject = ?", [subject]) if subject else ("", [])
        sql = f"SELECT {_COLUMNS} FROM events {where} ORDER BY time DESC, id DESC LIMIT ?"
        rows = self.store.query(sql, [*params, limit])
        return [_as_dict(row) for row in rows]

    def prune(self) -> int:
        """Delete rows older than EVENT_LOG_DAYS (0 keeps everything); returns how many went."""
        if not self.keep_days:
            return 0
        self.flush()
        cutoff = self.clock() - self.keep_days * 86400
        removed = self.store.execute("DELETE FROM events WHERE time < ?", (cutoff,))
        if removed:
            log.info("event log: pruned %d rows older than %d days", removed, self.keep_days)
        return removed

    def stats(self, since: float | None = None) -> list[dict]:
        """Per caller and model family: requests, how many were served, tokens."""
        self.flush()
        where, params = ("WHERE time >= ?", [since]) if since else ("", [])
        rows = self.store.query(
            "SELECT subject, family, COUNT(*), SUM(status BETWEEN 200 AND 299), "
            "SUM(tokens_in), SUM(tokens_out) FROM events "
            f"{where} GROUP BY subject, family ORDER BY SUM(tokens_in + tokens_out) DESC, subject, family",
            params,
        )
        return [
            {
                "user": subject,
                "family": family or "(none)",
                "requests": requests,
                "served": served or 0,
                "refused_or_failed": requests - (served or 0),
                "tokens_in": tokens_in or 0,
                "tokens_out": tokens_out or 0,
            }
            for subject, family, requests, served, tokens_in, tokens_out in rows
        ]


def _as_dict(row: tuple) -> dict:
    event = Event(*row[:-1], streamed=bool(row[-1]))
    return asdict(event)


def label_users(rows: list[dict], names: dict[str, str], anonymise: bool) -> list[dict]:
    """Replace each subject with a nickname (when known and not anonymising) or `user-N`."""
    numbered: dict[str, str] = {}
    out = []
    for row in rows:
        subject = row["user"]
        if anonymise:
            label = numbered.setdefault(subject, f"user-{len(numbered) + 1}")
        else:
            label = f"{names[subject]} ({subject})" if subject in names else subject
        out.append({**row, "user": label})
    return out


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STATS_HEADERS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row[k]) for k in STATS_HEADERS})
    return buffer.getvalue()


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(STATS_HEADERS) + " |", "|" + "---|" * len(STATS_HEADERS)]
    for row in rows:
        cells = [str(_cell(row[k])).replace("|", "\\|").replace("\n", " ") for k in STATS_HEADERS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> Any:
    """Spreadsheet-safe: a text cell never starts with a formula character."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
