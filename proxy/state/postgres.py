"""The Postgres `Store`: the same durable state as SQLite, shared by every instance of the proxy.

Writes go to one writer thread with its own connection (psycopg 3), which commits whatever has
queued up in one transaction (group commit). A caller on the event loop is never stalled by a
round trip: it queues the write and, before acknowledging the request, awaits `committed()`,
which resolves once everything queued before it is durable. A caller on another thread (start-up,
imports, tests) waits for its own commit, as with SQLite.

Migrations run at start under a transaction-level advisory lock, so instances starting together
apply each one once. A session-level advisory lock tells instances apart: one without shared fast
state (no REDIS_URL) holds it exclusively, so a second instance on the same database is refused
instead of silently keeping limits and lockouts of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import psycopg

from proxy.store import Counts, StoreError
from proxy.usage import UsageEvent

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x70726F78  # "prox": serialises migrations between instances starting together
INSTANCE_LOCK = 0x70726F79  # held by every running instance: exclusively by one without Redis
CONNECT_TIMEOUT_S = 5
RETRY_PAUSE_S = 0.5
COMMIT_WAIT_S = 15.0  # how long a request waits for its usage to be durable before failing
HEALTH_CHECK_S = 1.0  # while idle, the database is checked this often

MIGRATIONS: list[str] = [
    # 1: the tables the SQLite store has, with an order for users (SQLite's rowid).
    """
    CREATE TABLE users (
        seq BIGSERIAL,
        token TEXT PRIMARY KEY,
        data TEXT NOT NULL
    );
    CREATE TABLE usage_totals (
        scope TEXT NOT NULL,
        label TEXT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        tokens_in BIGINT NOT NULL DEFAULT 0,
        tokens_out BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, label)
    );
    CREATE TABLE key_states (
        service TEXT NOT NULL,
        key_id TEXT NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (service, key_id)
    );
    """,
]

_ADD_USAGE = """
INSERT INTO usage_totals (scope, label, requests, tokens_in, tokens_out) VALUES (%s, %s, 1, %s, %s)
ON CONFLICT (scope, label) DO UPDATE SET
    requests = usage_totals.requests + 1,
    tokens_in = usage_totals.tokens_in + EXCLUDED.tokens_in,
    tokens_out = usage_totals.tokens_out + EXCLUDED.tokens_out
"""
_SET_USAGE = """
INSERT INTO usage_totals (scope, label, requests, tokens_in, tokens_out) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (scope, label) DO UPDATE SET
    requests = EXCLUDED.requests, tokens_in = EXCLUDED.tokens_in, tokens_out = EXCLUDED.tokens_out
"""
_SAVE_USER = """
INSERT INTO users (token, data) VALUES (%s, %s) ON CONFLICT (token) DO UPDATE SET data = EXCLUDED.data
"""
# An instance's copy of a user's counters may be behind the others' charges: a routine save
# (an IP seen, a limit changed) keeps the database's counters; only `charge_user` moves them.
_SAVE_USER_KEEPING_COUNTERS = """
INSERT INTO users (token, data) VALUES (%s, %s) ON CONFLICT (token) DO UPDATE SET data = (
    EXCLUDED.data::jsonb || jsonb_strip_nulls(jsonb_build_object(
        'token_counts', users.data::jsonb -> 'token_counts',
        'lifetime_token_counts', users.data::jsonb -> 'lifetime_token_counts',
        'prompt_count', users.data::jsonb -> 'prompt_count',
        'counts_since', users.data::jsonb -> 'counts_since',
        'last_used_at', users.data::jsonb -> 'last_used_at'
    ))
)::text
"""
# One request's tokens, added where they are (every instance charges the same row), the period's
# counts first reset when they began before `since`.
_CHARGE_USER = """
WITH cur AS (
    SELECT token, CASE WHEN COALESCE((data::jsonb ->> 'counts_since')::float8, 0) < %(since)s
        THEN data::jsonb || jsonb_build_object('token_counts', '{}'::jsonb, 'counts_since', %(since)s)
        ELSE data::jsonb END AS j
    FROM users WHERE token = %(token)s FOR UPDATE
)
UPDATE users SET data = (
    jsonb_set(
        jsonb_set(
            cur.j || jsonb_build_object(
                'token_counts', COALESCE(cur.j -> 'token_counts', '{}'::jsonb),
                'lifetime_token_counts', COALESCE(cur.j -> 'lifetime_token_counts', '{}'::jsonb)
            ),
            ARRAY['token_counts', %(family)s],
            to_jsonb(COALESCE((cur.j -> 'token_counts' ->> %(family)s)::bigint, 0) + %(tokens)s)
        ),
        ARRAY['lifetime_token_counts', %(family)s],
        to_jsonb(COALESCE((cur.j -> 'lifetime_token_counts' ->> %(family)s)::bigint, 0) + %(tokens)s)
    ) || jsonb_build_object(
        'prompt_count', COALESCE((cur.j ->> 'prompt_count')::bigint, 0) + 1, 'last_used_at', %(now)s
    )
)::text
FROM cur WHERE users.token = cur.token
"""
_SAVE_KEY = """
INSERT INTO key_states (service, key_id, state) VALUES (%s, %s, %s)
ON CONFLICT (service, key_id) DO UPDATE SET state = EXCLUDED.state
"""

Job = Callable[[psycopg.Connection], Any]


def migrate(conn: psycopg.Connection) -> int:
    """Apply the migrations this database lacks, once even when instances start together."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] if row and row[0] is not None else 0
        if current > len(MIGRATIONS):
            raise StoreError(f"The database was written by a newer version (schema {current}).")
        for version in range(current + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[version - 1])
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return len(MIGRATIONS)


class PostgresStore:
    """`Store` on Postgres. `shared`: other instances share fast state through Redis, so several
    may run on this database; without it this instance must be the only one."""

    def __init__(self, url: str, *, shared: bool = False, commit_wait_s: float = COMMIT_WAIT_S) -> None:
        self._url = url
        self._shared = shared
        self.commit_wait_s = commit_wait_s
        self._jobs: queue.SimpleQueue[tuple[Job, Future] | None] = queue.SimpleQueue()
        self._closed = False
        self.healthy = False
        self.last_error = ""
        conn = self._connect(first=True)  # raises StoreError: a start must fail clearly
        self._thread = threading.Thread(target=self._run, args=(conn,), name="postgres-writer", daemon=True)
        self._thread.start()

    # Connection ------------------------------------------------------------------------------
    def _connect(self, first: bool = False) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self._url, connect_timeout=CONNECT_TIMEOUT_S, application_name="oai-proxy")
        except psycopg.Error as exc:
            raise StoreError(f"Cannot connect to the Postgres database: {_reason(exc)}") from None
        try:
            migrate(conn)
            conn.commit()
            self._take_instance_lock(conn, first)
        except BaseException:
            conn.close()
            raise
        self.healthy, self.last_error = True, ""
        return conn

    def _take_instance_lock(self, conn: psycopg.Connection, first: bool) -> None:
        fn = "pg_try_advisory_lock_shared" if self._shared else "pg_try_advisory_lock"
        got = conn.execute(f"SELECT {fn}(%s)", (INSTANCE_LOCK,)).fetchone()[0]
        conn.commit()
        if got:
            return
        message = (
            "Another instance without REDIS_URL is using this database: set REDIS_URL on every instance"
            if self._shared
            else "Other instances are using this database: set REDIS_URL (the same on all) so that they "
            "share limits, quotas and lockouts"
        )
        if first:
            raise StoreError(message)
        log.error("postgres: %s", message)

    # The writer ------------------------------------------------------------------------------
    def _run(self, conn: psycopg.Connection | None) -> None:
        while True:
            try:
                first = self._jobs.get(timeout=HEALTH_CHECK_S)
            except queue.Empty:
                conn = self._check(conn)
                continue
            if first is None:
                break
            batch = [first]
            stop = False
            while len(batch) < 500:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            conn = self._commit(conn, batch)
            if stop:
                break
        if conn is not None:
            conn.close()

    def _commit(self, conn: psycopg.Connection | None, batch: list[tuple[Job, Future]]) -> psycopg.Connection | None:
        """Run `batch` in one transaction; retry through lost connections until it commits
        (nothing queued is dropped while the database is away). A job whose own SQL fails is
        reported to its caller alone."""
        while True:
            if conn is None or conn.closed:
                try:
                    conn = self._connect()
                except StoreError as exc:
                    self._unhealthy(str(exc))
                    if self._closed:
                        _fail(batch, exc)
                        return None
                    time.sleep(RETRY_PAUSE_S)
                    continue
            try:
                results = []
                with conn.transaction():
                    for job, _ in batch:
                        results.append(job(conn))
            except psycopg.OperationalError as exc:
                self._unhealthy(f"Lost the Postgres database: {_reason(exc)}")
                conn.close()
                conn = None
                continue
            except psycopg.Error:
                if len(batch) > 1:  # find the culprit: each job in its own transaction
                    for item in batch:
                        conn = self._commit(conn, [item])
                    return conn
                _fail(batch, StoreError("The database refused a write."))
                log.exception("postgres: a write failed")
                return conn
            self.healthy = True
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            return conn

    def _check(self, conn: psycopg.Connection | None) -> psycopg.Connection | None:
        """While idle: notice a database gone (or back) before a request needs it."""
        try:
            if conn is None or conn.closed:
                return self._connect()
            conn.execute("SELECT 1")
            conn.rollback()
            self.healthy = True
            return conn
        except StoreError as exc:
            self._unhealthy(str(exc))
        except psycopg.Error as exc:
            self._unhealthy(f"Lost the Postgres database: {_reason(exc)}")
            if conn is not None:
                conn.close()
        return None

    def _unhealthy(self, message: str) -> None:
        if self.healthy or message != self.last_error:
            log.error("postgres: %s", message)
        self.healthy, self.last_error = False, message

    def _submit(self, job: Job) -> Future:
        if self._closed:
            raise StoreError("The store is closed.")
        future: Future = Future()
        self._jobs.put((job, future))
        return future

    def _write(self, job: Job) -> None:
        """Queue a write. Off the event loop, wait for its commit; on it, `committed()` does."""
        future = self._submit(job)
        if not _on_event_loop():
            future.result(self.commit_wait_s)

    def _read(self, job: Job) -> Any:
        return self._submit(job).result(self.commit_wait_s)

    async def committed(self) -> None:
        """Wait until every write queued so far is durable; StoreError when the database stays away."""
        future = asyncio.wrap_future(self._submit(lambda conn: None))
        deadline = time.monotonic() + self.commit_wait_s
        while not future.done():
            if not self.healthy:  # fail closed at once: the write stays queued for when it returns
                future.cancel()
                raise StoreError(f"The database is unavailable ({self.last_error}).")
            left = deadline - time.monotonic()
            if left <= 0:
                future.cancel()
                raise StoreError("The database did not confirm the write in time.")
            await asyncio.wait({future}, timeout=min(left, 0.05))
        future.result()

    # Store -----------------------------------------------------------------------------------
    def load_users(self) -> list[dict]:
        rows = self._read(lambda c: c.execute("SELECT data FROM users ORDER BY seq").fetchall())
        return [json.loads(data) for (data,) in rows]

    def load_user(self, token: str) -> dict | None:
        row = self._read(lambda c: c.execute("SELECT data FROM users WHERE token = %s", (token,)).fetchone())
        return json.loads(row[0]) if row else None

    def save_user(self, record: dict, *, counters: bool = True) -> None:
        """Write `record`; with `counters=False`, the database's usage counters are kept."""
        args = (record["token"], json.dumps(record, separators=(",", ":")))
        sql = _SAVE_USER if counters else _SAVE_USER_KEEPING_COUNTERS
        self._write(lambda c: c.execute(sql, args))

    def charge_user(self, token: str, family: str, tokens: int, *, since: float, now: float) -> None:
        """Add one request of `tokens` to a user's counters, atomically (instances charge together)."""
        args = {"token": token, "family": family, "tokens": int(tokens), "since": float(since), "now": float(now)}
        self._write(lambda c: c.execute(_CHARGE_USER, args))

    def save_users(self, records: Iterable[dict]) -> None:
        rows = [(r["token"], json.dumps(r, separators=(",", ":"))) for r in records]
        self._write(lambda c: c.cursor().executemany(_SAVE_USER, rows))

    def delete_user(self, token: str) -> None:
        self._write(lambda c: c.execute("DELETE FROM users WHERE token = %s", (token,)))

    def add_usage(self, event: UsageEvent) -> None:
        if not 200 <= event.status < 300:
            return
        rows = [("family", event.family, event.tokens_in, event.tokens_out)]
        if event.key_id:
            rows.append(("key", event.key_id, event.tokens_in, event.tokens_out))
        self._write(lambda c: c.cursor().executemany(_ADD_USAGE, rows))

    def usage_totals(self) -> tuple[Counts, Counts]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT scope, label, requests, tokens_in, tokens_out FROM usage_totals ORDER BY scope, label"
            ).fetchall()
        )
        by_scope: dict[str, Counts] = {"family": {}, "key": {}}
        for scope, label, requests, tokens_in, tokens_out in rows:
            by_scope.setdefault(scope, {})[label] = {
                "requests": requests,
                "tokens_in": tokens_in,
                "tokens_out": tokens_out,
            }
        return by_scope["family"], by_scope["key"]

    def set_usage_totals(self, by_family: Counts, by_key: Counts) -> None:
        rows = [
            (scope, label, int(c.get("requests", 0)), int(c.get("tokens_in", 0)), int(c.get("tokens_out", 0)))
            for scope, counts in (("family", by_family), ("key", by_key))
            for label, c in counts.items()
        ]
        self._write(lambda c: c.cursor().executemany(_SET_USAGE, rows))

    def save_key_state(self, service: str, key_id: str, state: dict) -> None:
        args = (service, key_id, json.dumps(state, separators=(",", ":")))
        self._write(lambda c: c.execute(_SAVE_KEY, args))

    def load_key_states(self, service: str) -> dict[str, dict]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT key_id, state FROM key_states WHERE service = %s ORDER BY key_id", (service,)
            ).fetchall()
        )
        return {key_id: json.loads(state) for key_id, state in rows}

    def ping(self) -> bool:
        """Whether the database answers now (for /health); never raises."""
        try:
            self._submit(lambda c: c.execute("SELECT 1")).result(2)
        except Exception:
            return False
        return True

    def close(self) -> None:
        """Commit what is queued, then close. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join(self.commit_wait_s)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _fail(batch: list[tuple[Job, Future]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


def _reason(exc: Exception) -> str:
    """psycopg's message without the connection string (it may hold a password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
