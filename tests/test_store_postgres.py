"""The Postgres store: the same durable state as SQLite, shared, and safe for several instances."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.state.postgres import MIGRATIONS, PostgresStore
from proxy.store import SQLiteStore, StoreError
from proxy.usage import UsageEvent

_names = itertools.count()


def event(family: str = "gpt-4o", key_id: str | None = "oai-1", status: int = 200, tin: int = 10, tout: int = 5):
    return UsageEvent(1.0, "openai", "gpt-4o", family, False, tin, tout, 12.0, status, key_id=key_id, user="alice")


@pytest.fixture
def pg_url(postgres: Any) -> str:
    return postgres.database(f"store_{next(_names)}")


@pytest.fixture(params=["sqlite", "postgres"])
def reopen(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A function opening the same store again, for either backend."""
    if request.param == "sqlite":
        return lambda: SQLiteStore.open(tmp_path)
    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


def test_users_usage_and_key_states_survive_reopening_on_both_backends(reopen: Any) -> None:
    store = reopen()
    store.save_user({"token": "tok-alice-0123456789", "nickname": "alice", "prompt_count": 3})
    store.save_user({"token": "tok-bob-0123456789", "nickname": "bob"})
    store.save_users([{"token": "tok-carol-0123456789", "nickname": "carol"}])
    store.save_user({"token": "tok-alice-0123456789", "nickname": "alice", "prompt_count": 4})
    store.delete_user("tok-bob-0123456789")
    store.add_usage(event())
    store.add_usage(event(tin=1, tout=2))
    store.add_usage(event(status=429))
    store.add_usage(event(family="claude-sonnet", key_id="ant-1"))
    store.save_key_state("openai", "oai-1", {"state": "revoked", "checked_at": 5.0})
    store.close()

    again = reopen()
    assert sorted(again.load_users(), key=lambda u: u["token"]) == [
        {"token": "tok-alice-0123456789", "nickname": "alice", "prompt_count": 4},
        {"token": "tok-carol-0123456789", "nickname": "carol"},
    ]
    by_family, by_key = again.usage_totals()
    assert by_family == {
        "claude-sonnet": {"requests": 1, "tokens_in": 10, "tokens_out": 5},
        "gpt-4o": {"requests": 2, "tokens_in": 11, "tokens_out": 7},
    }
    assert by_key["oai-1"] == {"requests": 2, "tokens_in": 11, "tokens_out": 7}
    again.set_usage_totals({"gpt-4o": {"requests": 9, "tokens_in": 1, "tokens_out": 1}}, {})
    assert again.usage_totals()[0]["gpt-4o"] == {"requests": 9, "tokens_in": 1, "tokens_out": 1}
    assert again.load_key_states("openai") == {"oai-1": {"state": "revoked", "checked_at": 5.0}}
    assert again.load_key_states("anthropic") == {}
    again.close()


def test_instances_starting_together_migrate_the_database_once(pg_url: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore(pg_url, shared=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(stores) == 6
    with psycopg.connect(pg_url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    stores[0].add_usage(event())
    assert stores[5].usage_totals()[0]["gpt-4o"]["requests"] == 1  # one database, seen by all
    for store in stores:
        store.close()


def test_a_second_instance_without_shared_fast_state_is_refused_with_the_reason(pg_url: str) -> None:
    solo = PostgresStore(pg_url, shared=False)
    with pytest.raises(StoreError, match="REDIS_URL"):
        PostgresStore(pg_url, shared=False)
    with pytest.raises(StoreError, match="REDIS_URL"):
        PostgresStore(pg_url, shared=True)
    solo.close()
    shared = [PostgresStore(pg_url, shared=True), PostgresStore(pg_url, shared=True)]
    with pytest.raises(StoreError, match="REDIS_URL"):
        PostgresStore(pg_url, shared=False)
    for store in shared:
        store.close()


def test_an_unreachable_database_stops_the_start_with_a_clear_message_and_no_password() -> None:
    with pytest.raises(StoreError) as caught:
        PostgresStore("postgresql://proxy:pw-secret-1@127.0.0.1:1/proxy")
    assert "Cannot connect to the Postgres database" in str(caught.value)
    assert "pw-secret-1" not in str(caught.value)


def test_writes_on_the_event_loop_are_queued_and_durable_once_committed_returns(pg_url: str) -> None:
    store = PostgresStore(pg_url)

    async def serve_requests() -> None:
        for _ in range(50):
            store.add_usage(event())
        await store.committed()

    asyncio.run(serve_requests())
    with psycopg.connect(pg_url) as conn:  # another connection: what any instance would read
        row = conn.execute("SELECT requests, tokens_in FROM usage_totals WHERE label = 'gpt-4o'").fetchone()
    assert row == (50, 500)
    store.close()


def test_usage_written_while_the_database_is_down_lands_when_it_returns(postgres: Any, pg_url: str) -> None:
    store = PostgresStore(pg_url, commit_wait_s=1.0)
    store.add_usage(event())
    postgres.pg_ctl("-m", "fast", "stop")
    try:

        async def during_outage() -> None:
            store.add_usage(event(tin=100))
            with pytest.raises(StoreError, match="unavailable|did not confirm"):
                await store.committed()  # the request is not acknowledged

        asyncio.run(during_outage())
        assert not store.healthy and store.last_error
    finally:
        postgres.pg_ctl("-o", f"-p {postgres.port} -c listen_addresses=127.0.0.1 -k {postgres.directory}",
                        "-l", str(postgres.directory / "log"), "start")  # fmt: skip
    deadline = time.monotonic() + 20
    while not store.healthy and time.monotonic() < deadline:  # it reconnects by itself
        time.sleep(0.05)
    assert store.healthy
    asyncio.run(store.committed())
    assert store.usage_totals()[0]["gpt-4o"] == {"requests": 2, "tokens_in": 110, "tokens_out": 10}
    store.close()


def test_instances_charging_one_user_together_lose_no_tokens(pg_url: str) -> None:
    a, b = PostgresStore(pg_url, shared=True), PostgresStore(pg_url, shared=True)
    a.save_user({"token": "tok-shared-0123456789", "token_counts": {}, "lifetime_token_counts": {},
                 "counts_since": 100.0, "prompt_count": 0})  # fmt: skip

    def charge(store: PostgresStore) -> None:
        for _ in range(25):
            store.charge_user("tok-shared-0123456789", "gpt-4o", 10, since=100.0, now=150.0)

    threads = [threading.Thread(target=charge, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # A routine save from an instance whose copy is behind keeps the database's counters.
    b.save_user({"token": "tok-shared-0123456789", "nickname": "renamed", "token_counts": {"gpt-4o": 1},
                 "lifetime_token_counts": {}, "counts_since": 100.0, "prompt_count": 0}, counters=False)  # fmt: skip
    (user,) = a.load_users()
    assert user["token_counts"] == {"gpt-4o": 1000} and user["lifetime_token_counts"] == {"gpt-4o": 1000}
    assert user["prompt_count"] == 100 and user["nickname"] == "renamed" and user["last_used_at"] == 150.0
    a.charge_user("tok-shared-0123456789", "gpt-4o", 5, since=200.0, now=201.0)  # a new quota period
    (user,) = b.load_users()
    assert user["token_counts"] == {"gpt-4o": 5} and user["lifetime_token_counts"] == {"gpt-4o": 1005}
    assert user["counts_since"] == 200.0
    a.close()
    b.close()


def test_the_event_log_and_owner_settings_work_on_postgres(pg_url: str) -> None:
    """Modules that write their own SQL (in SQLite's dialect) run unchanged on Postgres."""
    from proxy.eventlog import Event, EventLog

    store = PostgresStore(pg_url)
    events = EventLog(store, keep_days=1, clock=lambda: 10_000_000.0)
    salt = events._salt
    assert EventLog(store, keep_days=1)._salt == salt  # kept in owner_settings
    for status in (200, 200, 429):
        events.record(Event(9_999_990.5, "h:abc", "openai", "gpt-4o", "gpt-4o", status, 10, 5, 12.5, None, False))
    events.record(Event(1.0, "h:old", "openai", "gpt-4o", "gpt-4o", 200, 1, 1, 1.0, None, True))
    assert [e["status"] for e in events.recent("h:abc", 10)] == [429, 200, 200]
    stats = {row["user"]: row for row in events.stats()}
    assert stats["h:abc"]["requests"] == 3 and stats["h:abc"]["served"] == 2 and stats["h:abc"]["tokens_in"] == 30
    assert events.prune() == 1 and "h:old" not in {row["user"] for row in events.stats()}
    store.close()


def test_a_request_is_not_acknowledged_when_its_commit_hangs_past_the_wait(pg_url: str) -> None:
    store = PostgresStore(pg_url, commit_wait_s=1.0)
    try:
        async def request() -> float:
            store.execute("SELECT pg_sleep(3)")  # queued: the writer is busy (a database answering slowly)
            store.add_usage(event())
            started = time.monotonic()
            with pytest.raises(StoreError, match="did not confirm"):
                await store.committed()
            return time.monotonic() - started

        waited = asyncio.run(request())
        assert 0.9 <= waited <= 2.0
        time.sleep(2.5)  # the slow statement ends; then the write lands
        assert store.usage_totals()[0]["gpt-4o"]["requests"] == 1
    finally:
        store.close()


def test_a_request_whose_write_the_database_refuses_is_not_acknowledged_and_the_next_ones_are(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:

        async def requests() -> None:
            store.add_usage(event(tin=2**70))  # past BIGINT: Postgres refuses the row
            with pytest.raises(StoreError):
                await store.committed()
            store.add_usage(event())
            await asyncio.wait_for(store.committed(), 5)  # the writer goes on with the next ones

        asyncio.run(requests())
        assert store.usage_totals()[0]["gpt-4o"]["requests"] == 1
    finally:
        store.close()
