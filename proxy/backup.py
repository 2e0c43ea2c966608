"""Backups of the database to a private Hugging Face dataset repo, and restore at start.

A Space's disk is wiped on restart; with HF_TOKEN and STATE_REPO set, the database is copied
(sqlite3's backup API: a consistent snapshot) and uploaded every BACKUP_INTERVAL seconds and
at shutdown, and downloaded at start when DATA_DIR has no database.

Upload path: `upload_file` asks the Hub (`/preupload`) whether the file is "regular" or "lfs".
A database is binary, so "lfs"; with hf_xet installed that would go through Xet, unless the
content is a binary file object, which huggingface_hub sends over plain HTTP (the LFS batch
API, then one PUT). We pass an open file, so the backup needs nothing but HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

from huggingface_hub import HfApi
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from proxy.config import Settings
from proxy.errors import Redactor
from proxy.store import DB_FILENAME, SQLiteStore

log = logging.getLogger(__name__)

T = TypeVar("T")
RestoreResult = Literal["restored", "exists", "none", "failed"]


class _QuietXetFallback(logging.Filter):
    """huggingface_hub warns on every upload of a file object that it bypasses Xet: we mean it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "not supported by Xet Storage" not in record.getMessage()


logging.getLogger("huggingface_hub._commit_api").addFilter(_QuietXetFallback())


class Backup:
    """Copies the database at `db_path` to `repo_id` (a private dataset) and back.

    Call `restore_if_empty()` before opening the store, then set `store`, then run `run()`.
    If a restore fails for a reason other than "no backup yet", backups stay off for this run,
    so an empty database never replaces a good backup."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        repo_id: str,
        token: str,
        interval: float = 600.0,
        endpoint: str | None = None,
        store: SQLiteStore | None = None,
        filename: str = DB_FILENAME,
        final_timeout: float = 60.0,
        upload_timeout: float = 600.0,
    ) -> None:
        self.db_path = Path(db_path)
        self.repo_id = repo_id
        self.interval = interval
        self.filename = filename
        self.store = store
        self.final_timeout = final_timeout
        self.upload_timeout = upload_timeout
        self.enabled = True
        self.last_error: str | None = None
        self._api = HfApi(endpoint=endpoint, token=token, library_name="oai-reverse-proxy")
        self._redact = Redactor([token])
        self._repo_ready = False
        self._last_digest: bytes | None = None
        self._busy = threading.Lock()  # one upload at a time, even if an earlier one outlived its timeout

    @classmethod
    def from_settings(cls, settings: Settings, *, endpoint: str | None = None) -> Backup | None:
        """A Backup when STATE_REPO is set (Settings ensures HF_TOKEN is too), else None."""
        if not settings.state_repo:
            return None
        return cls(
            settings.sqlite_path,
            repo_id=settings.state_repo,
            token=settings.hf_token,
            interval=settings.backup_interval,
            endpoint=endpoint,
        )

    def restore_if_empty(self) -> RestoreResult:
        """Download the last backup when there is no local database. Blocking; call at start."""
        for stale in self.db_path.parent.glob(f".{self.db_path.name}.*.backup"):  # left by a killed process
            stale.unlink(missing_ok=True)
        if self.db_path.exists() and self.db_path.stat().st_size > 0:
            return "exists"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self.db_path.parent, prefix=".restore-") as tmp:
                path = self._api.hf_hub_download(
                    repo_id=self.repo_id, filename=self.filename, repo_type="dataset", local_dir=tmp
                )
                _check_database(Path(path))
                for suffix in ("-wal", "-shm", "-journal"):  # never pair a restored file with stale logs
                    Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)
                os.replace(path, self.db_path)
        except (RepositoryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError):  # not LocalEntryNotFound
            log.info("backup: no backup in %s yet; starting with an empty database", self.repo_id)
            return "none"
        except Exception as exc:
            self.enabled = False
            self.last_error = self._describe(exc)
            log.error(
                "backup: could not restore from %s (%s); backups are off until restart so the backup is kept",
                self.repo_id,
                self.last_error,
            )
            return "failed"
        log.info("backup: restored the database from %s", self.repo_id)
        return "restored"

    def backup_now(self) -> bool:
        """Snapshot and upload the database; False when skipped (unchanged, off, or no store).

        Blocking (network): `run()` calls it in a thread."""
        if not self.enabled or self.store is None:
            return False
        if not self._busy.acquire(blocking=False):
            log.warning("backup: the previous upload is still running; skipping this one")
            return False
        fd, name = tempfile.mkstemp(dir=self.db_path.parent, prefix=f".{self.db_path.name}.", suffix=".backup")
        os.close(fd)
        snapshot = Path(name)
        try:
            self.store.backup_to(snapshot)
            digest = _sha256(snapshot)
            if digest == self._last_digest:
                return False
            if not self._repo_ready:
                self._api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
                self._repo_ready = True
            with snapshot.open("rb") as file:  # a file object: plain HTTP upload, not Xet
                self._api.upload_file(
                    path_or_fileobj=file,
                    path_in_repo=self.filename,
                    repo_id=self.repo_id,
                    repo_type="dataset",
                    commit_message="Back up the proxy's state",
                )
            self._last_digest = digest
            self.last_error = None
            log.info("backup: uploaded the database to %s", self.repo_id)
            return True
        finally:
            snapshot.unlink(missing_ok=True)
            self._busy.release()

    async def run(self, stop_event: asyncio.Event) -> None:
        """Back up every `interval` seconds, and once more when `stop_event` is set; then return."""
        while True:
            final = stop_event.is_set()
            if not final:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_event.wait(), timeout=self.interval)
                final = stop_event.is_set()
            try:
                await asyncio.wait_for(
                    _in_daemon_thread(self.backup_now), self.final_timeout if final else self.upload_timeout
                )
            except Exception as exc:
                self.last_error = self._describe(exc)
                log.error("backup: upload to %s failed: %s", self.repo_id, self.last_error)
            if final:
                return

    def _describe(self, exc: BaseException) -> str:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return self._redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run `fn` in a daemon thread. Unlike `asyncio.to_thread`, a call stuck on the network
    holds up neither `asyncio.run`'s exit (it joins the default executor) nor the interpreter's."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return  # the caller gave up waiting
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            outcome: tuple[T | None, BaseException | None] = (fn(), None)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=target, name="state-backup", daemon=True).start()
    return await future


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def _check_database(path: Path) -> None:
    """Raise unless `path` is an intact SQLite database with a users table."""
    conn = sqlite3.connect(path)
    try:
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise ValueError("the downloaded database is damaged")
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'users'").fetchone() is None:
            raise ValueError("the downloaded file is not this proxy's database")
    finally:
        conn.close()
