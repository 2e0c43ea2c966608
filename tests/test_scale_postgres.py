"""The proxy on Postgres: usage is durable before it is acknowledged, and a database outage gives
clear 503s (never unaccounted service), then recovery by itself."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeOpenAI

_names = itertools.count()
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def on_postgres(postgres: Any, proxy_app: Callable[..., Served], fake_openai: FakeOpenAI) -> tuple[Served, str]:
    url = postgres.database(f"e2e_{next(_names)}")
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY, DATABASE_URL=url)
    return served, url


def post(served: Served, body: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{served.proxy()}/chat/completions", json=body or CHAT,
        headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=30,
    )  # fmt: skip


def totals(url: str) -> tuple[int, int] | None:
    with psycopg.connect(url) as conn:
        sql = "SELECT sum(requests), sum(tokens_in + tokens_out) FROM usage_totals WHERE scope = 'family'"
        return conn.execute(sql).fetchone()


def test_a_served_request_is_in_the_database_before_the_client_has_its_reply(on_postgres: tuple[Served, str]) -> None:
    served, url = on_postgres
    for stream in (False, True):
        response = post(served, {**CHAT, "stream": stream})
        assert response.status_code == 200
        done = totals(url)  # read at once, from another connection: no waiting for a background write
        assert done is not None and done[1] > 0
    assert totals(url)[0] == 2
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "database": "ok"}


def test_while_postgres_is_down_requests_get_a_clear_503_and_service_resumes_when_it_returns(
    postgres: Any, on_postgres: tuple[Served, str], fake_openai: FakeOpenAI
) -> None:
    served, url = on_postgres
    assert post(served).status_code == 200
    ok = 1
    postgres.pg_ctl("-m", "fast", "stop")
    try:
        deadline = time.monotonic() + 10
        while (response := post(served)).status_code == 200 and time.monotonic() < deadline:
            ok += 1  # cannot happen once the store knows; counted so the check below is exact
            time.sleep(0.2)
        assert response.status_code == 503
        assert "database or shared state is unavailable" in response.json()["error"]["message"]
        assert response.headers["retry-after"] == "5"
        health = httpx.get(f"{served.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "unavailable", "database": "unavailable"}
    finally:
        postgres.pg_ctl("-o", f"-p {postgres.port} -c listen_addresses=127.0.0.1 -k {postgres.directory}",
                        "-l", str(postgres.directory / "log"), "start")  # fmt: skip
    deadline = time.monotonic() + 15
    while (response := post(served)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert response.status_code == 200
    assert httpx.get(f"{served.url}/health").json()["database"] == "ok"
    # Every 200 the client saw is in the database; so is what the upstream served for a request
    # whose usage could not be confirmed in time (answered 503): its tokens were spent all the same.
    chats = sum(1 for r in fake_openai.requests if r.path.endswith("/chat/completions"))
    assert ok + 1 <= totals(url)[0] == chats
