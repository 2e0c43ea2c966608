"""The request path's writes to SQLite, committed together once per turn of the event loop.

Each finished request used to cost its own transactions: one for the usage totals and, under
GATEKEEPER=user_token, one more rewriting its user's whole row (two commits, the record encoded
each time). Here those writes are collected in memory (usage summed by label, users as a set)
and written at the end of the event loop's current turn, in one transaction for all the requests
that finished in it. The pipeline answers a request only once that transaction has committed
(`committed`, its `durable` hook), so, as before, nothing acknowledged is lost across a crash.

A batch that cannot be written is not acknowledged, as with Postgres (proxy/state/postgres.py):
- the disk failing (full, an I/O error: `sqlite3.OperationalError`, OSError): its requests get a
  503, its writes are kept and retried every RETRY_S seconds, and meanwhile the database is
  reported down (`problem`: /health, and new requests are refused before they reach an
  upstream) until a retry commits;
- a write SQLite refuses (a count past its 64-bit integers): its requests get a 503, and the
  batch's writes are tried one by one: only those refused again are dropped (a label's total
  summed from several requests goes with the one that cannot be written).

Writes made off the event loop that armed the batch (an admin's thread, a test without a loop)
are written at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading

from proxy.access.users import User, UserService
from proxy.store import SQLiteStore, StoreError
from proxy.usage import UsageEvent

log = logging.getLogger(__name__)

RETRY_S = 1.0  # how often writes the disk refused are tried again
# The disk's failures (kept and retried); anything else is a write SQLite will never take.
_DISK_ERRORS = (sqlite3.OperationalError, OSError)


class GroupCommit:
    """Usage and users' counts of the requests of one loop turn, in one SQLite transaction."""

    def __init__(self, store: SQLiteStore, users: UserService | None = None) -> None:
        self.store = store
        self.users = users
        self._usage: dict[tuple[str, str], list[int]] = {}  # (scope, label) -> [requests, in, out]
        self._users: dict[int, User] = {}  # by id(): User is a mutable dataclass, unhashable
        self._done: asyncio.Future[None] | None = None  # resolved when the pending writes commit
        self._lock = threading.Lock()  # the pending writes, against a flush at close from another thread
        self.batches = 0  # transactions written (for tests and the benchmark's curiosity)
        self.writes = 0  # writes they carried
        self.failing: str | None = None  # why the disk refused the last batch; None once one commits
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    # What the request path hands over --------------------------------------------------------
    def add_usage(self, event: UsageEvent) -> None:
        """The ledger's sink: like `SQLiteStore.add_usage` (only successful requests count)."""
        if not 200 <= event.status < 300:
            return
        with self._lock:
            if self._arm():
                self._add(("family", event.family), event)
                if event.key_id:
                    self._add(("key", event.key_id), event)
                self.writes += 1
                return
        self.store.add_usage(event)

    def save_user(self, user: User) -> bool:
        """`UserService.deferred`: the user's record is written with this turn's batch (built
        then, so it holds every change made meanwhile). False off the loop: write it yourself."""
        with self._lock:
            if not self._arm():
                return False
            self._users[id(user)] = user
            self.writes += 1
            return True

    async def committed(self) -> None:
        """Wait until every write handed over so far is committed; StoreError when its batch could
        not be written (the request must not be acknowledged)."""
        done = self._done
        if done is not None and done.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(done)  # a request cancelled meanwhile must not cancel it for others

    def problem(self) -> str | None:
        """Why the database is down (the disk refused the last batch), or None: a dependency
        check (proxy/state/health.py)."""
        return self.failing

    # The batch -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what is pending, in one transaction. Called at the end of the turn, and at close."""
        with self._lock:
            done, self._done = self._done, None
            usage, self._usage = self._usage, {}
            users, self._users = self._users, {}
        failure: StoreError | None = None
        try:
            if usage or users:
                self._write(usage, users)
                self.batches += 1
                self._recovered()
        except _DISK_ERRORS as exc:
            failure = self._disk_failed(exc, usage, users)
        except Exception as exc:  # a write SQLite will never take: the others go on their own
            log.exception("the database refused a batch of usage and users' counts; its writes are tried one by one")
            failure = self._salvage(usage, users) or StoreError(
                f"The database refused the usage ({type(exc).__name__})."
            )
        finally:
            if done is not None and not done.done():
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
                    if failure is None:
                        done.set_result(None)
                    else:
                        done.set_exception(failure)
                        done.exception()  # retrieved: nobody may be waiting, which is no error

    def _write(self, usage: dict[tuple[str, str], list[int]], users: dict[int, User]) -> None:
        rows = [(scope, label, *counts) for (scope, label), counts in usage.items()]
        if self.users is not None:
            self.users.write_through(users.values(), lambda records: self.store.write_batch(rows, records))
        else:
            self.store.write_batch(rows, [user.record() for user in users.values()])

    def _recovered(self) -> None:
        if self.failing is not None:
            log.warning("usage is saved to the database again")
            self.failing = None

    def _disk_failed(
        self, exc: BaseException, usage: dict[tuple[str, str], list[int]], users: dict[int, User]
    ) -> StoreError:
        """The disk refused `usage` and `users`: kept for the retry, the database reported down."""
        if self.failing is None:  # once, not at every retry
            log.error("could not save usage and users' counts to the database (%s: %s); tried again every %gs",
                      type(exc).__name__, exc, RETRY_S)  # fmt: skip
        with self._lock:
            self._keep(usage, users)
        self.failing = f"usage could not be saved ({type(exc).__name__})"
        self._retry_later()
        return StoreError(f"The database could not save usage ({type(exc).__name__}).")

    def _salvage(self, usage: dict[tuple[str, str], list[int]], users: dict[int, User]) -> StoreError | None:
        """The writes of a batch SQLite refused, each on its own: only those it refuses again are
        dropped (writes kept from a disk failure go on). A disk failure meanwhile keeps the rest
        for the retry: its error is returned."""
        pieces = [({key: counts}, {}) for key, counts in usage.items()]
        pieces += [({}, {key: user}) for key, user in users.items()]
        dropped: list[str] = []
        for i, (one_usage, one_user) in enumerate(pieces):
            try:
                self._write(one_usage, one_user)
            except _DISK_ERRORS as exc:
                rest_usage = {key: counts for part, _ in pieces[i:] for key, counts in part.items()}
                rest_users = {key: user for _, part in pieces[i:] for key, user in part.items()}
                return self._disk_failed(exc, rest_usage, rest_users)
            except Exception as exc:
                what = f"usage of {next(iter(one_usage))}" if one_usage else "a user's counts"
                dropped.append(f"{what} ({type(exc).__name__})")
        if dropped:
            shown = ", ".join(dropped[:5])
            log.error("dropped %d of %d writes the database refuses: %s", len(dropped), len(pieces), shown)
        if len(dropped) < len(pieces):  # something landed: the database takes writes
            self._recovered()
        elif self.failing is not None:  # still down: the retry decides
            self._retry_later()
        return None

    def _retry_later(self) -> None:
        """Flush again in RETRY_S: the writes kept must land without waiting for new requests
        (which are refused while the disk fails)."""
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # off the loop: nothing there to run a retry
            return
        if self._retry is None:
            self._retry = loop.call_later(RETRY_S, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self._closed or self.failing is None:
            return
        with self._lock:
            pending = bool(self._usage or self._users)
        if pending:
            self.flush()
        else:  # what failed was dropped since: the next request's write will tell
            self._recovered()

    def _keep(self, usage: dict[tuple[str, str], list[int]], users: dict[int, User]) -> None:
        """Writes that failed, kept for the next batch (added to what came meanwhile)."""
        for key, counts in usage.items():
            mine = self._usage.setdefault(key, [0, 0, 0])
            for i, n in enumerate(counts):
                mine[i] += n
        for key, user in users.items():
            self._users.setdefault(key, user)

    def close(self) -> None:
        """Write what is still pending (before the store closes); no retry after this."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.flush()

    def _add(self, key: tuple[str, str], event: UsageEvent) -> None:
        counts = self._usage.get(key)
        if counts is None:
            self._usage[key] = [1, event.tokens_in, event.tokens_out]
        else:
            counts[0] += 1
            counts[1] += event.tokens_in
            counts[2] += event.tokens_out

    def _arm(self) -> bool:
        """Make sure a flush runs at the end of this turn; False off the loop that will run it.
        The caller holds `_lock`."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        done = self._done
        if done is None:
            self._done = loop.create_future()
            loop.call_soon(self.flush)
            return True
        return done.get_loop() is loop
