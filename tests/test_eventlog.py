"""The event log: one row per request (never prompt text), a user's recent events and usage
statistics from the admin API, and pruning after EVENT_LOG_DAYS."""

from __future__ import annotations

import csv
import io

import httpx
import pytest

from proxy.eventlog import Event, EventLog
from proxy.store import SQLiteStore
from tests.conftest import PAID, Served
from tests.fakes import FakeOpenAI

ADMIN = "admin-key-for-event-tests-01"
SECRET_PROMPT = "my very private prompt about zebras"


def admin(served: Served) -> httpx.Client:
    return httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"}, timeout=10)


def chat(served: Served, token: str, model: str = "gpt-4o", stream: bool = False) -> httpx.Response:
    return httpx.post(
        f"{served.proxy()}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": SECRET_PROMPT}], "stream": stream},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )


@pytest.fixture
def logged(proxy_app, fake_openai: FakeOpenAI) -> Served:
    return proxy_app(
        OPENAI_KEY=PAID,
        OPENAI_BASE_URL=fake_openai.base_url,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN,
        EVENT_LOGGING="true",
    )


def test_each_request_is_one_row_newest_first_without_prompt_text(logged: Served) -> None:
    alice = admin(logged).post("/users", json={"nickname": "alice"}).json()["token"]
    bob = admin(logged).post("/users", json={"nickname": "bob"}).json()["token"]
    served_reply = chat(logged, alice)
    assert served_reply.status_code == 200
    assert chat(logged, alice, stream=True).status_code == 200
    assert chat(logged, alice, model="gpt-nonexistent-9").status_code == 404
    assert chat(logged, bob).status_code == 200
    assert chat(logged, "not-a-token").status_code == 401

    events = admin(logged).get("/events", params={"user": alice, "limit": 10}).json()["events"]
    assert [e["status"] for e in events] == [404, 200, 200]  # newest first
    assert [e["streamed"] for e in events] == [False, True, False]
    usage = served_reply.json()["usage"]
    assert events[2]["tokens_in"] == usage["prompt_tokens"] and events[2]["tokens_out"] == usage["completion_tokens"]
    assert all(e["service"] == "openai" and e["latency_ms"] > 0 for e in events)
    assert events[0]["model"] == "gpt-nonexistent-9"
    assert all(e["subject"].startswith("h:") and alice not in e["subject"] for e in events)
    assert len(admin(logged).get("/events", params={"limit": 1}).json()["events"]) == 1
    everyone = admin(logged).get("/events", params={"limit": 100}).json()["events"]
    assert len(everyone) == 5
    assert everyone[0]["status"] == 401 and everyone[0]["subject"].startswith("ip:")
    assert "127.0.0.1" not in everyone[0]["subject"]

    logged.runtime.access.store.close()  # flush the WAL: then the whole database is one file
    database = (logged.settings.data_dir / "proxy.sqlite3").read_bytes()
    assert SECRET_PROMPT.encode() not in database and b"zebras" not in database


def test_stats_export_as_csv_and_markdown_optionally_anonymised(logged: Served) -> None:
    alice = admin(logged).post("/users", json={"nickname": "alice"}).json()["token"]
    for _ in range(2):
        assert chat(logged, alice).status_code == 200
    assert chat(logged, alice, model="gpt-nonexistent-9").status_code == 404

    as_csv = admin(logged).get("/stats", params={"format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    gpt4o = next(r for r in rows if r["family"] == "gpt-4o")
    assert gpt4o["user"].startswith("alice (h:")
    assert (gpt4o["requests"], gpt4o["served"], gpt4o["refused_or_failed"]) == ("2", "2", "0")
    assert int(gpt4o["tokens_in"]) > 0 and int(gpt4o["tokens_out"]) > 0

    hidden = admin(logged).get("/stats", params={"format": "md", "anonymise": "true"})
    assert hidden.headers["content-type"].startswith("text/markdown")
    lines = hidden.text.strip().splitlines()
    assert lines[0] == "| user | family | requests | served | refused_or_failed | tokens_in | tokens_out |"
    assert "user-1" in hidden.text and "alice" not in hidden.text and "h:" not in hidden.text
    assert admin(logged).get("/stats", params={"format": "xml"}).status_code == 400
    assert admin(logged).get("/events", params={"limit": 0}).status_code == 400


def test_the_event_log_is_off_by_default(shared) -> None:
    fake, served = shared
    reply = httpx.get(f"{served.url}/admin/api/events", headers={"authorization": "Bearer x"}, timeout=5)
    assert reply.status_code in (401, 503)  # no admin key on this proxy
    assert served.runtime.owner.events is None
    tables = served.runtime.access.store.query("SELECT name FROM sqlite_master WHERE name = 'events'")
    assert tables == []


def test_rows_older_than_event_log_days_are_pruned(tmp_path) -> None:
    now = [1_000_000.0]
    store = SQLiteStore.open(tmp_path)
    events = EventLog(store, keep_days=2, clock=lambda: now[0])

    def row(at: float) -> Event:
        return Event(at, "h:abc", "openai", "gpt-4o", "gpt-4o", 200, 1, 2, 3.0, None, False)

    events.record(row(now[0] - 3 * 86400))
    events.record(row(now[0] - 1 * 86400))
    assert events.prune() == 1
    assert [e["time"] for e in events.recent("h:abc", 10)] == [now[0] - 86400]
    assert EventLog(store, keep_days=0).prune() == 0  # 0 keeps everything
    store.close()
