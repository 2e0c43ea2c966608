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
import collections
import contextlib
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

from proxy.store import Counts, StoreError, total_rows, totals_from_rows
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
INSERT INTO usage_totals (scope, label, requests, tokens_in, tokens_out) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (scope, label) DO UPDATE SET
    requests = usage_totals.requests + EXCLUDED.requests,
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
# Quota refresh (proxy/access/refresh.py) where the counts are: each non-temporary user's limit for
# every family with a default becomes what they used plus the default; other limits are kept.
_REFRESH_LIMITS = """
UPDATE users SET data = (
    data::jsonb || jsonb_build_object('token_limits',
        COALESCE(data::jsonb -> 'token_limits', '{}'::jsonb) || COALESCE((
            SELECT jsonb_object_agg(d.key, COALESCE((users.data::jsonb -> 'token_counts' ->> d.key)::bigint, 0)
                + d.value::bigint)
            FROM jsonb_each_text(%(defaults)s::jsonb) AS d
        ), '{}'::jsonb))
)::text
WHERE COALESCE(data::jsonb ->> 'type', 'normal') <> 'temporary' AND (%(token)s::text IS NULL OR token = %(token)s)
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
        self._jobs: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        # Every write is numbered as it is queued; `_done` is the number of the last one committed
        # (batches commit in queue order). A request waits until `_done` passes what was queued
        # when it asked: no item of its own, one wake-up per loop per batch.
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._done = 0
        self._waiters: dict[asyncio.AbstractEventLoop, collections.deque[_Waiter]] = {}
        self._watchdogs: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
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
            conn.autocommit = True  # a batch of usage is one statement; others open a transaction
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
            while len(batch) < 1000:
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

    def _commit(self, conn: psycopg.Connection | None, batch: list[_Item]) -> psycopg.Connection | None:
        """Run `batch` in one transaction (usage increments merged, statements pipelined); retry
        through lost connections until it commits (nothing queued is dropped while the database
        is away: the requests waiting on it are failed at once, their writes kept). A job whose
        own SQL fails is reported to its caller alone."""
        while True:
            if conn is None or conn.closed:
                try:
                    conn = self._connect()
                except StoreError as exc:
                    self._unhealthy(str(exc))
                    self._fail_loop_waiters(self._seq, exc)  # every waiting request: 503 now
                    batch = _fail_waiters(batch, exc, everything=self._closed)
                    if not batch or self._closed:
                        return None
                    time.sleep(RETRY_PAUSE_S)
                    continue
            try:
                results = self._execute(conn, batch)
            except psycopg.OperationalError as exc:
                self._unhealthy(f"Lost the Postgres database: {_reason(exc)}")
                conn.close()
                conn = None
                continue
            except psycopg.Error:
                if len(batch) > 1:  # find the culprit: each item in its own transaction
                    for item in batch:
                        conn = self._commit(conn, [item])
                    return conn
                refused = StoreError("The database refused a write.")
                _fail_waiters(batch, refused, everything=True)
                log.exception("postgres: a write failed")
                # Not kept (nothing more will come of it), and not acknowledged: the requests
                # waiting for it are failed, as the threads are; the next writes go on.
                self._done = batch[-1].seq
                self._fail_loop_waiters(batch[-1].seq, refused)
                return conn
            self.healthy = True
            _resolve(batch, results)
            self._committed_through(batch[-1].seq)
            return conn

    @staticmethod
    def _execute(conn: psycopg.Connection, batch: list[_Item]) -> list[Any]:
        usage: dict[tuple[str, str], list[int]] = {}
        results: list[Any] = []
        if all(item.kind == "usage" for item in batch):
            # What every request writes: all of the batch's usage merged into one statement, which
            # autocommits: one round trip for the batch.
            for item in batch:
                if item.kind == "usage":
                    _merge_usage(usage, item.payload)
                results.append(None)
            if usage:
                conn.execute(*_add_usage_statement(usage))
            return results
        reads = any(item.kind == "read" for item in batch)
        with conn.transaction(), (contextlib.nullcontext() if reads else conn.pipeline()):
            for item in batch:
                if item.kind == "usage":  # many requests' usage: one statement for all
                    _merge_usage(usage, item.payload)
                    results.append(None)
                else:
                    results.append(item.payload(conn))
            if usage:
                conn.execute(*_add_usage_statement(usage))
        return results

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

    def _put(self, item: _Item) -> None:
        if self._closed:
            raise StoreError("The store is closed.")
        with self._seq_lock:  # numbered in queue order
            self._seq += 1
            item.seq = self._seq
            self._jobs.put(item)

    # Waiting for commits on an event loop ------------------------------------------------------
    def _committed_through(self, seq: int) -> None:
        """(writer) Everything numbered up to `seq` is committed: wake the loops' waiters."""
        self._done = seq
        for loop in list(self._waiters):
            if loop.is_closed():  # (tests run one loop after another)
                self._waiters.pop(loop, None)
                self._watchdogs.pop(loop, None)
                continue
            with contextlib.suppress(RuntimeError):  # a loop closed meanwhile
                loop.call_soon_threadsafe(self._advance, loop, seq, None)

    def _fail_loop_waiters(self, seq: int, exc: Exception) -> None:
        """(writer) The database is away: whoever waits for a write up to `seq` is told at once."""
        for loop in list(self._waiters):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._advance, loop, seq, exc)

    def _advance(self, loop: asyncio.AbstractEventLoop, seq: int, exc: Exception | None) -> None:
        waiters = self._waiters.get(loop)
        while waiters and waiters[0].seq <= seq:
            future = waiters.popleft().future
            if future.done():
                continue
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(StoreError(f"The database is unavailable ({exc})."))

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the waits that have lasted `commit_wait_s` (the database hangs without an error)."""
        waiters = self._waiters[loop]
        while True:
            await asyncio.sleep(min(1.0, self.commit_wait_s / 2))
            now = time.monotonic()
            while waiters and waiters[0].deadline <= now:
                future = waiters.popleft().future
                if not future.done():
                    future.set_exception(StoreError("The database did not confirm the write in time."))

    def _write(self, job: Job, kind: str = "job") -> None:
        """Queue a write. Off the event loop, wait for its commit; on it, `committed()` does."""
        if _on_event_loop():
            self._put(_Item(kind, job))
            return
        future: Future = Future()
        self._put(_Item(kind, job, future))
        self._wait(future)

    def _read(self, job: Job) -> Any:
        future: Future = Future()
        self._put(_Item("read", job, future))
        return self._wait(future)

    def _wait(self, future: Future) -> Any:
        try:
            return future.result(self.commit_wait_s)
        except TimeoutError:
            raise StoreError(f"The database did not answer in time ({self.last_error or 'busy'}).") from None

    async def committed(self) -> None:
        """Wait until every write queued so far is durable; StoreError at once while the database
        is away (the writes stay queued and land when it returns)."""
        if not self.healthy:
            raise StoreError(f"The database is unavailable ({self.last_error}).")
        seq = self._seq
        if self._done >= seq:
            return
        loop = asyncio.get_running_loop()
        waiters = self._waiters.get(loop)
        if waiters is None:
            waiters = self._waiters[loop] = collections.deque()
            self._watchdogs[loop] = loop.create_task(self._watch(loop), name="postgres-commit-watch")
        future = loop.create_future()
        waiters.append(_Waiter(seq, future, time.monotonic() + self.commit_wait_s))
        if self._done >= seq:  # committed meanwhile (the writer's wake-up may already have run)
            self._advance(loop, self._done, None)
        await future

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

    def refresh_limits(self, defaults: Mapping[str, int], token: str | None = None) -> None:
        """Quota refresh on the database's own counts (every instance's charges), for every user
        but temporary ones, or only `token`'s; waits for the commit (call it off the event loop)."""
        args = {"defaults": json.dumps({f: int(n) for f, n in defaults.items()}), "token": token}
        future: Future = Future()
        self._put(_Item("job", lambda c: c.execute(_REFRESH_LIMITS, args), future))
        self._wait(future)

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
        self._write(rows, "usage")  # type: ignore[arg-type]

    def usage_totals(self) -> tuple[Counts, Counts]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT scope, label, requests, tokens_in, tokens_out FROM usage_totals ORDER BY scope, label"
            ).fetchall()
        )
        return totals_from_rows(rows)

    def set_usage_totals(self, by_family: Counts, by_key: Counts) -> None:
        rows = total_rows(by_family, by_key)
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

    # Tables other modules own (the event log, owner settings), written in SQLite's dialect: the
    # few SQLite-isms they use are translated (`?`, INSERT OR REPLACE, INTEGER PRIMARY KEY, REAL).
    def execute(self, sql: str, params: Iterable | None = ()) -> int:
        """Run one statement (or a script when `params` is None); the rows changed (0 when queued
        from the event loop: `committed()` waits for it)."""
        text = sqlite_to_postgres(sql)
        args = None if params is None else tuple(params)

        def job(conn: psycopg.Connection) -> int:
            cursor = conn.execute(text) if args is None else conn.execute(text, args)
            return max(cursor.rowcount, 0)

        if _on_event_loop():
            self._put(_Item("job", job))
            return 0
        future: Future = Future()
        self._put(_Item("read", job, future))
        return int(self._wait(future) or 0)

    def execute_many(self, sql: str, rows: Iterable[Iterable]) -> None:
        text, batch = sqlite_to_postgres(sql), [tuple(r) for r in rows]
        if batch:
            self._write(lambda c: c.cursor().executemany(text, batch))

    def query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        text, args = sqlite_to_postgres(sql), tuple(params)
        rows = self._read(lambda c: c.execute(text, args).fetchall())
        return [tuple(_plain(v) for v in row) for row in rows]

    def close(self) -> None:
        """Commit what is queued, then close. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join(self.commit_wait_s)
        for loop, task in list(self._watchdogs.items()):
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)


_OR_REPLACE = re.compile(r"INSERT\s+OR\s+REPLACE\s+INTO\s+(\w+)\s*\(([^)]*)\)", re.I)
_SUM_OF_TEST = re.compile(r"SUM\(([^()]*?\sBETWEEN\s[^()]*?)\)", re.I)


def sqlite_to_postgres(sql: str) -> str:
    """The SQLite-isms of the modules that write their own SQL, in Postgres's dialect."""
    replace = _OR_REPLACE.search(sql)
    text = sql.replace("?", "%s")
    text = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGSERIAL PRIMARY KEY", text)
    text = re.sub(r"\bREAL\b", "DOUBLE PRECISION", text)
    text = re.sub(r"\bINTEGER\b", "BIGINT", text)
    text = _SUM_OF_TEST.sub(r"SUM(CASE WHEN \1 THEN 1 ELSE 0 END)", text)
    if replace is not None:  # a row replaced by its primary key
        table, columns = replace.group(1), [c.strip() for c in replace.group(2).split(",")]
        text = _OR_REPLACE.sub(f"INSERT INTO {table} ({replace.group(2)})", text).rstrip().rstrip(";")
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns)
        text += f" ON CONFLICT ON CONSTRAINT {table}_pkey DO UPDATE SET {updates}"
    return text


def _plain(value: Any) -> Any:
    """Postgres's sums are numeric: the ints and floats SQLite would have given."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _on_event_loop() -> bool:
    return asyncio._get_running_loop() is not None  # noqa: SLF001 (get_running_loop raises: slower)


def _merge_usage(usage: dict[tuple[str, str], list[int]], rows: list[tuple[str, str, int, int]]) -> None:
    for scope, label, tokens_in, tokens_out in rows:
        total = usage.setdefault((scope, label), [0, 0, 0])
        total[0] += 1
        total[1] += tokens_in
        total[2] += tokens_out


def _add_usage_statement(usage: dict[tuple[str, str], list[int]]) -> tuple[str, list[Any]]:
    """One INSERT … ON CONFLICT adding every (scope, label)'s merged counts (each label once, in a
    fixed order, so that concurrent instances lock rows in the same order)."""
    params: list[Any] = []
    for (scope, label), (requests, tokens_in, tokens_out) in sorted(usage.items()):
        params += (scope, label, requests, tokens_in, tokens_out)
    values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(usage))
    return _ADD_USAGE.replace("VALUES (%s, %s, %s, %s, %s)", f"VALUES {values}", 1), params


@dataclass(slots=True)
class _Item:
    """One thing for the writer: a `job` (a function of the connection), a `read` (the same, its
    result wanted) or `usage` (rows to add, merged with the batch's others). `seq`: its number."""

    kind: str
    payload: Any
    waiter: Future | None = None  # a thread waiting for this item (loops wait by number)
    seq: int = 0


@dataclass(slots=True)
class _Waiter:
    """A request on an event loop waiting for every write numbered up to `seq` to commit."""

    seq: int
    future: asyncio.Future
    deadline: float


def _resolve(batch: list[_Item], results: list[Any]) -> None:
    """Hand each waiting thread its result."""
    for item, result in zip(batch, results, strict=True):
        if item.waiter is not None and not item.waiter.done():
            item.waiter.set_result(result)


def _fail_waiters(batch: list[_Item], exc: Exception, *, everything: bool) -> list[_Item]:
    """Fail the threads waiting on `batch`'s items with `everything`, and say what is left to
    retry: without `everything`, every item (the writes are kept until the database returns)."""
    if not everything:
        return batch
    for item in batch:
        if item.waiter is not None and not item.waiter.done():
            item.waiter.set_exception(exc)
    return []


def _reason(exc: Exception) -> str:
    """psycopg's message without the connection string (it may hold a password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
