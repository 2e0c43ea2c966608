"""Access control: who may use the proxy (gatekeeper, users) and how much (quotas, rate limits).

`build_access(settings)` assembles the whole of it, with the store and the optional backup."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.access.gatekeeper import Gatekeeper
from proxy.access.users import UserService
from proxy.config import Settings
from proxy.state import open_store
from proxy.store import SQLiteStore, Store

if TYPE_CHECKING:
    from proxy.backup import Backup
    from proxy.groupcommit import GroupCommit


@dataclass
class Access:
    """The store, the users and the gatekeeper over them, and the backup when configured."""

    store: Store
    users: UserService
    gatekeeper: Gatekeeper
    backup: Backup | None = None
    # SQLite: the request path's writes, one transaction per turn of the event loop (see build_access)
    commits: GroupCommit | None = None
    _stop: asyncio.Event | None = field(default=None, init=False, repr=False)
    _task: asyncio.Task | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        """Start the periodic backup (call from the app's lifespan, on the running loop)."""
        if self.backup is not None and self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self.backup.run(self._stop), name="state-backup")

    async def aclose(self) -> None:
        """Take a last backup (when configured, within its `final_timeout`), then close the database."""
        if self._task is not None and self._stop is not None and self.backup is not None:
            self._stop.set()
            with contextlib.suppress(TimeoutError):  # an upload stuck in its thread: give up on it
                await asyncio.wait_for(self._task, self.backup.final_timeout + 5)
            self._task = None
        if self.commits is not None:
            self.commits.close()
        self.store.close()


def build_access(
    settings: Settings, clock: Callable[[], float] = time.time, *, hub_endpoint: str | None = None
) -> Access:
    """Restore the database from the Hub if DATA_DIR has none (when STATE_REPO is set), open it,
    and build the users and the gatekeeper. Blocking: call once at start."""
    backup = None
    if settings.state_repo:
        from proxy.backup import Backup

        backup = Backup.from_settings(settings, endpoint=hub_endpoint)
        assert backup is not None
        backup.restore_if_empty()
    store = open_store(settings)
    if backup is not None:
        backup.store = store
    users = UserService(
        store, clock=clock, refresh_period=settings.quota_refresh_period, default_limits=settings.token_quota
    )
    gatekeeper = Gatekeeper(settings, users=users, clock=clock)
    commits = None
    if isinstance(store, SQLiteStore):
        from proxy.groupcommit import GroupCommit

        commits = GroupCommit(store, users)
        users.deferred = commits.save_user
    return Access(store=store, users=users, gatekeeper=gatekeeper, backup=backup, commits=commits)
