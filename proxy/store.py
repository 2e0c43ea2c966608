"""Persistence of users, usage totals and key states: SQLite by default, behind `Store`.

Every write commits before it returns, so whatever the proxy acknowledged survives a killed
process. One connection, guarded by a lock, is the only writer: the database may live on a
FUSE mount (Spaces storage) that has no file locks, hence `locking_mode=EXCLUSIVE`, which also
keeps a second process from opening the same file.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from proxy.usage import UsageEvent

log = logging.getLogger(__name__)

DB_FILENAME = "proxy.sqlite3"
SCHEMA_VERSION = 1

Counts = dict[str, dict[str, int]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    token TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_totals (
    scope TEXT NOT NULL,            -- 'family' or 'key'
    label TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    tokens_in INTEGER NOT NULL DEFAULT 0,
    tokens_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, label)
);
CREATE TABLE IF NOT EXISTS key_states (
    service TEXT NOT NULL,
    key_id TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (service, key_id)
);
CREATE TABLE IF NOT EXISTS lost_models (  -- learnt since the key's state was last saved whole
    service TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    PRIMARY KEY (service, key_id, model)
) WITHOUT ROWID;
"""

# Requests' usage added to a label's totals (one request, or a batch summed first: groupcommit.py).
_ADD_USAGE = """
INSERT INTO usage_totals (scope, label, requests, tokens_in, tokens_out) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (scope, label) DO UPDATE SET
    requests = requests + excluded.requests,
    tokens_in = tokens_in + excluded.tokens_in,
    tokens_out = tokens_out + excluded.tokens_out
"""

# Updated in place: INSERT OR REPLACE deletes the row and inserts it again under a new rowid, which
# rewrites index pages too and cost 2x-4x as much per save in a table of 10,000 users.
_SAVE_USER = "INSERT INTO users (token, data) VALUES (?, ?) ON CONFLICT (token) DO UPDATE SET data = excluded.data"

_SET_USAGE = """
INSERT OR REPLACE INTO usage_totals (scope, label, requests, tokens_in, tokens_out) VALUES (?, ?, ?, ?, ?)
"""


def totals_from_rows(rows: Iterable[tuple]) -> tuple[Counts, Counts]:
    """(by_family, by_key) from `usage_totals` rows (scope, label, requests, tokens_in, tokens_out)."""
    by_scope: dict[str, Counts] = {"family": {}, "key": {}}
    for scope, label, requests, tokens_in, tokens_out in rows:
        by_scope.setdefault(scope, {})[label] = {
            "requests": requests,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
        }
    return by_scope["family"], by_scope["key"]


def total_rows(by_family: Counts, by_key: Counts) -> list[tuple[str, str, int, int, int]]:
    """`usage_totals` rows for the totals given: the inverse of `totals_from_rows`."""
    return [
        (scope, label, int(c.get("requests", 0)), int(c.get("tokens_in", 0)), int(c.get("tokens_out", 0)))
        for scope, counts in (("family", by_family), ("key", by_key))
        for label, c in counts.items()
    ]


class StoreError(Exception):
    """The database cannot be opened or used; the message says why."""


class Store(Protocol):
    """What the proxy persists. Another backend (Redis, Postgres) implements the same methods."""

    def load_users(self) -> list[dict]: ...
    def save_user(self, record: dict) -> None: ...
    def save_users(self, records: Iterable[dict]) -> None: ...
    def delete_user(self, token: str) -> None: ...
    def add_usage(self, event: UsageEvent) -> None: ...
    def usage_totals(self) -> tuple[Counts, Counts]: ...
    def set_usage_totals(self, by_family: Counts, by_key: Counts) -> None: ...
    def save_key_state(self, service: str, key_id: str, state: dict) -> None: ...
    def add_lost_model(self, service: str, key_id: str, model: str) -> None: ...
    def load_key_states(self, service: str) -> dict[str, dict]: ...
    async def committed(self) -> None: ...
    def close(self) -> None: ...


class SQLiteStore:
    """The default `Store`: one SQLite file in WAL mode, one connection, one writer at a time.

    Thread-safe: the pipeline writes from the event loop, admin routes and backups from other
    threads; a lock serialises them. Writes are small (tens of microseconds on a local disk)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=0.5)
            self._configure()
        except sqlite3.OperationalError as exc:
            hint = " (is another instance of the proxy using it?)" if "locked" in str(exc) else ""
            raise StoreError(f"Cannot open the database {path}: {exc}{hint}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"The database {path} is not usable: {exc}") from None

    @classmethod
    def open(cls, data_dir: str | Path) -> SQLiteStore:
        """Open (or create) the database in `data_dir`, creating the directory when missing."""
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / DB_FILENAME)

    def _configure(self) -> None:
        conn = self._conn
        # EXCLUSIVE before WAL: SQLite then keeps the WAL index in memory instead of a shared
        # -shm file, which FUSE mounts without mmap or locks cannot provide.
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        if self.path is not None:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("SQLite could not use WAL on %s; using journal mode %s", self.path, mode)
        # In WAL mode, NORMAL syncs at checkpoints only: a committed transaction survives a killed
        # process (it is in the OS's cache), and power loss can only lose the latest few.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)  # the first write also takes the exclusive lock, held from now on
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"The database was written by a newer version (schema {version}).")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # Users: one JSON record per token.
    def load_users(self) -> list[dict]:
        with self._lock:
            rows = self._conn.execute("SELECT data FROM users ORDER BY rowid").fetchall()
        return [json.loads(data) for (data,) in rows]

    def save_user(self, record: dict) -> None:
        data = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._conn.execute(_SAVE_USER, (record["token"], data))

    def save_users(self, records: Iterable[dict]) -> None:
        rows = [(r["token"], json.dumps(r, separators=(",", ":"))) for r in records]
        with self._lock, self._transaction():
            self._conn.executemany(_SAVE_USER, rows)

    def delete_user(self, token: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM users WHERE token = ?", (token,))

    # Usage totals: the same rule as `UsageLedger`: only successful requests count.
    def add_usage(self, event: UsageEvent) -> None:
        if not 200 <= event.status < 300:
            return
        with self._lock, self._transaction():
            self._conn.execute(_ADD_USAGE, ("family", event.family, 1, event.tokens_in, event.tokens_out))
            if event.key_id:
                self._conn.execute(_ADD_USAGE, ("key", event.key_id, 1, event.tokens_in, event.tokens_out))

    def write_batch(self, usage: Iterable[tuple[str, str, int, int, int]], users: Iterable[dict]) -> None:
        """Usage added up by label, (scope, label, requests, tokens_in, tokens_out), and whole user
        records, in one transaction: what a turn of the event loop's requests wrote."""
        rows = [(r["token"], json.dumps(r, separators=(",", ":"))) for r in users]
        with self._lock, self._transaction():
            self._conn.executemany(_ADD_USAGE, usage)
            self._conn.executemany(_SAVE_USER, rows)

    def usage_totals(self) -> tuple[Counts, Counts]:
        """(by_family, by_key), each {label: {"requests", "tokens_in", "tokens_out"}}."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT scope, label, requests, tokens_in, tokens_out FROM usage_totals ORDER BY scope, label"
            ).fetchall()
        return totals_from_rows(rows)

    def set_usage_totals(self, by_family: Counts, by_key: Counts) -> None:
        """Replace the totals of the labels given (an import); other labels are kept."""
        rows = total_rows(by_family, by_key)
        with self._lock, self._transaction():
            self._conn.executemany(_SET_USAGE, rows)

    # Key states: whatever the key pool wants to remember about a key, as JSON.
    def save_key_state(self, service: str, key_id: str, state: dict) -> None:
        """The key's whole state; its `lost_models` list (if any) replaces those added one by one."""
        data = json.dumps(state, separators=(",", ":"))
        with self._lock, self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO key_states (service, key_id, state) VALUES (?, ?, ?)", (service, key_id, data)
            )
            if "lost_models" in state:
                self._conn.execute("DELETE FROM lost_models WHERE service = ? AND key_id = ?", (service, key_id))

    def add_lost_model(self, service: str, key_id: str, model: str) -> None:
        """One more model the key cannot use: one small row, not the key's whole state again."""
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO lost_models (service, key_id, model) VALUES (?, ?, ?)", (service, key_id, model)
            )

    def load_key_states(self, service: str) -> dict[str, dict]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT key_id, state FROM key_states WHERE service = ? ORDER BY key_id", (service,)
            ).fetchall()
            lost_rows = self._conn.execute(
                "SELECT key_id, model FROM lost_models WHERE service = ? ORDER BY key_id, model", (service,)
            ).fetchall()
        states = {key_id: json.loads(state) for key_id, state in rows}
        for key_id, model in lost_rows:
            state = states.setdefault(key_id, {})
            known = state.get("lost_models")
            state["lost_models"] = [*(known if isinstance(known, list) else []), model]
        return states

    # Tables other modules own (settings edited at run time, the event log): plain SQL under
    # the same lock, each statement committed before it returns.
    def execute(self, sql: str, params: Iterable | None = ()) -> int:
        """Run one statement (or a script when `params` is None); returns the rows changed."""
        with self._lock:
            if params is None:
                self._conn.executescript(sql)
                return 0
            return self._conn.execute(sql, tuple(params)).rowcount

    def execute_many(self, sql: str, rows: Iterable[Iterable]) -> None:
        """One statement for each row, in one transaction."""
        with self._lock, self._transaction():
            self._conn.executemany(sql, [tuple(r) for r in rows])

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()
    async def committed(self) -> None:
        """Every write so far is durable: SQLite commits each before returning."""

    # Whole-database operations.
    def backup_to(self, target: str | Path) -> None:
        """Write a consistent single-file copy of the database to `target` (sqlite3 backup API)."""
        dest = sqlite3.connect(str(target))
        try:
            with self._lock:
                self._conn.backup(dest)
            dest.execute("PRAGMA journal_mode=DELETE")  # a standalone file, no -wal beside it
        finally:
            dest.close()

    def close(self) -> None:
        """Checkpoint the WAL into the database file and close. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.path is not None:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the block raises. The caller holds the store's lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
