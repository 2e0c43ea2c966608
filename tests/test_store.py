"""The SQLite store: what it keeps, across restarts and killed processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.store import DB_FILENAME, SQLiteStore, StoreError
from proxy.usage import UsageEvent, UsageLedger

ROOT = Path(__file__).resolve().parents[1]


def event(family: str = "gpt-4o", key_id: str | None = "oai-1", status: int = 200, tin: int = 10, tout: int = 5):
    return UsageEvent(1.0, "openai", "gpt-4o", family, False, tin, tout, 12.0, status, key_id=key_id, user="alice")


def test_the_data_directory_is_created_when_missing(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path / "a" / "b")
    store.close()
    assert (tmp_path / "a" / "b" / DB_FILENAME).is_file()


def test_users_usage_and_key_states_survive_reopening(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    store.save_user({"token": "tok-alice-0123456789", "nickname": "alice", "prompt_count": 3})
    store.save_user({"token": "tok-bob-0123456789", "nickname": "bob"})
    store.save_user({"token": "tok-alice-0123456789", "nickname": "alice", "prompt_count": 4})
    store.delete_user("tok-bob-0123456789")
    store.add_usage(event())
    store.add_usage(event(tin=1, tout=2))
    store.add_usage(event(family="claude-sonnet", key_id="ant-1"))
    store.save_key_state("openai", "oai-1", {"state": "revoked", "checked_at": 5.0})
    store.save_key_state("anthropic", "ant-1", {"state": "ok"})
    store.close()

    reopened = SQLiteStore.open(tmp_path)
    assert reopened.load_users() == [{"token": "tok-alice-0123456789", "nickname": "alice", "prompt_count": 4}]
    by_family, by_key = reopened.usage_totals()
    assert by_family == {
        "claude-sonnet": {"requests": 1, "tokens_in": 10, "tokens_out": 5},
        "gpt-4o": {"requests": 2, "tokens_in": 11, "tokens_out": 7},
    }
    assert by_key["oai-1"] == {"requests": 2, "tokens_in": 11, "tokens_out": 7}
    assert reopened.load_key_states("openai") == {"oai-1": {"state": "revoked", "checked_at": 5.0}}
    assert reopened.load_key_states("anthropic") == {"ant-1": {"state": "ok"}}
    reopened.close()


def test_usage_totals_count_only_successful_requests_like_the_ledger(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    ledger = UsageLedger(sink=store.add_usage)
    for status in (200, 429, 500, 201):
        ledger.record(event(status=status))
    restored = UsageLedger()
    restored.restore(*store.usage_totals())
    assert restored.snapshot() == ledger.snapshot()
    assert restored.by_key["oai-1"].requests == 2
    store.close()


def test_an_import_replaces_the_totals_it_names_and_keeps_the_others(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    store.add_usage(event(family="gpt-4o"))
    store.add_usage(event(family="gpt-5", key_id=None))
    store.set_usage_totals({"gpt-4o": {"requests": 7, "tokens_in": 70, "tokens_out": 7}}, {})
    by_family, _ = store.usage_totals()
    assert by_family["gpt-4o"] == {"requests": 7, "tokens_in": 70, "tokens_out": 7}
    assert by_family["gpt-5"]["requests"] == 1
    store.close()


def test_a_second_process_cannot_open_a_database_in_use(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    code = f"from proxy.store import SQLiteStore; SQLiteStore.open({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "another instance" in result.stderr
    store.close()
    with pytest.raises(StoreError):
        SQLiteStore(tmp_path / "not-a-dir" / "x" / DB_FILENAME)


def test_backup_to_writes_a_standalone_consistent_copy(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path / "live")
    store.save_user({"token": "tok-alice-0123456789", "nickname": "alice"})
    store.add_usage(event())
    store.backup_to(tmp_path / "copy.sqlite3")
    store.save_user({"token": "tok-later-0123456789", "nickname": "later"})
    store.close()
    assert not (tmp_path / "copy.sqlite3-wal").exists()
    copy = SQLiteStore(tmp_path / "copy.sqlite3")
    assert [u["nickname"] for u in copy.load_users()] == ["alice"]
    assert copy.usage_totals()[0]["gpt-4o"]["requests"] == 1
    copy.close()


_WRITER = textwrap.dedent(
    """
    import sys
    from proxy.store import SQLiteStore
    from proxy.usage import UsageEvent
    store = SQLiteStore.open(sys.argv[1])
    i = 0
    while True:
        i += 1
        store.add_usage(UsageEvent(1.0, "openai", "m", "gpt-4o", False, 1, 0, 1.0, 200, key_id="k"))
        store.save_user({"token": "tok-writer-0123456789", "prompt_count": i})
        print(i, flush=True)  # acknowledged: both writes returned
    """
)


def test_everything_acknowledged_survives_kill_9(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    acknowledged = 0
    while acknowledged < 300:
        acknowledged = int(writer.stdout.readline())
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=10)
    for line in writer.stdout:  # acknowledgements already in the pipe when it died
        acknowledged = int(line)

    store = SQLiteStore.open(tmp_path)
    requests = store.usage_totals()[0]["gpt-4o"]["requests"]
    prompt_count = store.load_users()[0]["prompt_count"]
    store.close()
    assert requests >= acknowledged and prompt_count >= acknowledged
    assert requests - prompt_count in (0, 1)  # at most the one write in progress at the kill

    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_saving_a_user_again_updates_its_row_in_place_and_keeps_the_creation_order(tmp_path: Path) -> None:
    # INSERT OR REPLACE moved the row (a delete and an insert under a new rowid, index pages
    # rewritten): each save of a user cost 2x-4x as much in a table of 10,000 users (issue 14).
    store = SQLiteStore.open(tmp_path)
    store.save_users({"token": f"tok-{i:04d}-0123456789", "nickname": f"u{i}"} for i in range(50))
    rowid = store.query("SELECT rowid FROM users WHERE token = ?", ("tok-0007-0123456789",))
    store.save_user({"token": "tok-0007-0123456789", "nickname": "u7", "prompt_count": 1})
    store.save_users([{"token": "tok-0003-0123456789", "nickname": "u3", "prompt_count": 2}])
    assert store.query("SELECT rowid FROM users WHERE token = ?", ("tok-0007-0123456789",)) == rowid
    assert [u["nickname"] for u in store.load_users()] == [f"u{i}" for i in range(50)]
    assert store.load_users()[7]["prompt_count"] == 1 and store.load_users()[3]["prompt_count"] == 2
    store.close()
