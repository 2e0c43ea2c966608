"""Where the proxy's state lives: the durable `Store` (SQLite or Postgres), chosen by settings."""

from __future__ import annotations

from proxy.config import Settings
from proxy.store import SQLiteStore, Store, StoreError

__all__ = ["Store", "StoreError", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store DATABASE_URL names (SQLite in DATA_DIR by default). Raises StoreError with the reason."""
    if settings.database_kind == "postgres":
        from proxy.state.postgres import PostgresStore

        return PostgresStore(settings.database_url, shared=settings.shared_state)
    path = settings.sqlite_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return SQLiteStore(path)
