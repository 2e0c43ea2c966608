"""Two proxy instances on one Postgres and one Redis behave as one proxy."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import PAID, Served
from tests.fakes import FakeOpenAI, KeyBehaviour

_names = itertools.count()
ADMIN = "admin-key-for-scale-0001"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
REVOKED = "sk-revoked-0123456789abcdef"


@pytest.fixture
def two(postgres: Any, redis: Any, proxy_app: Callable[..., Served]) -> Callable[..., tuple[Served, Served]]:
    """two(**env): two instances with the same settings, sharing a fresh database and Redis."""

    def start(**env: str) -> tuple[Served, Served]:
        import redis as redis_client

        with redis_client.Redis.from_url(redis.url) as client:  # a deployment of its own
            client.flushall()
        shared = {"DATABASE_URL": postgres.database(f"two_{next(_names)}"), "REDIS_URL": redis.url, **env}
        return proxy_app(**shared), proxy_app(**shared)

    return start


def admin(served: Served) -> httpx.Client:
    return httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


def chat(served: Served, token: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{served.proxy()}/chat/completions", json={**CHAT, **extra},
        headers={"Authorization": f"Bearer {token}"}, timeout=30,
    )  # fmt: skip


def test_a_user_created_through_one_instance_is_served_by_the_other_at_once(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    with admin(a) as api:
        token = api.post("/users", json={"nickname": "carol"}).json()["token"]
    assert chat(b, token).status_code == 200
    with admin(a) as api:
        assert api.patch(f"/users/{token}", json={"disabled": True}).status_code == 200
    deadline = time.monotonic() + 1.0  # within a second on every instance
    while (refused := chat(b, token)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused.status_code == 403
    with admin(b) as api:
        assert api.delete(f"/users/{token}").status_code == 204
    deadline = time.monotonic() + 1.0
    while (gone := chat(a, token)).status_code != 401 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone.status_code == 401


def test_usage_from_both_instances_adds_up_on_the_user(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    with admin(a) as api:
        token = api.post("/users", json={"nickname": "dan"}).json()["token"]
    for served in (a, b, a, b, b):
        assert chat(served, token).status_code == 200
    with admin(a) as api:
        api.patch(f"/users/{token}", json={"nickname": "dan2"})  # a routine save keeps b's charges
    with admin(b) as api:
        deadline = time.monotonic() + 1.0
        while (user := api.get(f"/users/{token}").json())["nickname"] != "dan2" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert user["prompt_count"] == 5 and sum(user["lifetime_token_counts"].values()) > 0


def test_a_key_revoked_on_one_instance_is_skipped_by_the_other(
    two: Callable[..., tuple[Served, Served]], proxy_key: str = "pk-two-instances-0001"
) -> None:
    with FakeOpenAI({PAID: KeyBehaviour("paid"), REVOKED: KeyBehaviour("revoked")}) as fake:
        a, b = two(OPENAI_KEY=f"{REVOKED},{PAID}", OPENAI_BASE_URL=fake.base_url, PROXY_KEY=proxy_key)
        for _ in range(2):  # least recently used first: one of these tries the revoked key
            assert chat(a, proxy_key).status_code == 200
        assert fake.calls_by_key.get(REVOKED) == 1
        time.sleep(0.3)  # well within the second the issue allows
        for _ in range(6):
            assert chat(b, proxy_key).status_code == 200
        assert fake.calls_by_key.get(REVOKED) == 1  # b never tried it
        status = httpx.get(f"{b.url}/status").json()["keys"]["openai"]
        assert status["revoked"] == 1


def test_stopping_redis_gives_503s_and_service_resumes_by_itself(
    redis: Any, two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    a, _ = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY="pk-two-instances-0002")
    assert chat(a, "pk-two-instances-0002").status_code == 200
    redis.stop()
    try:
        deadline = time.monotonic() + 5
        while (reply := chat(a, "pk-two-instances-0002")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reply.status_code == 503
        assert "shared state is unavailable" in reply.json()["error"]["message"]
        health = httpx.get(f"{a.url}/health")
        assert health.status_code == 503 and health.json()["redis"] == "unavailable"
    finally:
        redis.start()
    deadline = time.monotonic() + 10
    while (reply := chat(a, "pk-two-instances-0002")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reply.status_code == 200
    assert httpx.get(f"{a.url}/health").json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_the_page_s_calls_are_vouched_for_on_every_instance(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    """The page calls its own server; behind a balancer (or with WORKERS > 1) that may be another
    instance, which must still believe which visitor the call is for."""
    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY="pk-two-instances-0003")

    class Visitor:
        client = type("Peer", (), {"host": "203.0.113.7"})()
        headers: dict[str, str] = {}

    headers = a.runtime.page_headers(Visitor())
    seen = type("Call", (), {"client": type("Peer", (), {"host": "127.0.0.1"})(), "headers": headers})()
    assert b.runtime.client_ip(seen) == "203.0.113.7"


def test_the_page_shows_the_recent_requests_and_totals_of_every_instance(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.state.sync

    monkeypatch.setattr(proxy.state.sync, "TOTALS_REFRESH_S", 0.2)
    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY="pk-two-instances-0004")
    for served, model in ((a, "gpt-4o-mini"), (b, "gpt-4o"), (b, "gpt-4o")):
        assert chat(served, "pk-two-instances-0004", model=model).status_code == 200
    deadline = time.monotonic() + 3
    while len(a.runtime.ledger.recent(10)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["model"] for e in a.runtime.ledger.recent(10)] == ["gpt-4o", "gpt-4o", "gpt-4o-mini"]
    assert all("key_id" not in e for e in a.runtime.ledger.recent(10))
    while httpx.get(f"{a.url}/status").json()["usage"]["requests"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{a.url}/status").json()["usage"]["requests"] == 3


def _user(served: Served, **limits: int) -> str:
    with admin(served) as api:
        created = api.post("/users", json={"nickname": "racer", "token_limits": limits})
        assert created.status_code == 201, created.text
        return created.json()["token"]


def test_a_twenty_way_quota_race_over_two_instances_admits_exactly_one(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    import concurrent.futures

    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    token = _user(a, **{"gpt-4o-mini": 1000})
    fake_openai.hang_first_byte = 1.0  # the winner still holds its share while the others arrive
    # No max_tokens: each request holds its prompt and what is left for the reply (capped to it).
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda i: chat((a, b)[i % 2], token), range(20)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) == 1, statuses
    assert set(statuses) - {200} <= {402, 429}


def test_a_rate_limit_of_n_a_minute_holds_across_two_instances(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY="pk-two-instances-0005",
               TEXT_MODEL_RATE_LIMIT="5")  # fmt: skip
    statuses = [chat((a, b)[i % 2], "pk-two-instances-0005").status_code for i in range(12)]
    assert statuses.count(200) == 5 and statuses.count(429) == 7
    refused = chat(a, "pk-two-instances-0005")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


def test_a_concurrency_limit_holds_across_two_instances(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    import concurrent.futures

    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
               USER_CONCURRENCY_LIMIT="1")  # fmt: skip
    token = _user(a)
    fake_openai.hang_first_byte = 1.0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, a, token)
        time.sleep(0.3)
        second = pool.submit(chat, b, token)
        assert second.result().status_code == 429
        assert first.result().status_code == 200
    fake_openai.hang_first_byte = 0.0
    assert chat(b, token).status_code == 200  # the slot came back


def test_guessing_user_tokens_on_both_instances_locks_the_address_out_on_both(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    from proxy.access.gatekeeper import GUESS_LIMIT

    a, b = two(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    token = _user(a)
    for i in range(GUESS_LIMIT):
        assert chat((a, b)[i % 2], f"wrong-token-{i:04d}-0123456789").status_code == 401
    time.sleep(0.3)  # the lockout is announced to every instance
    for served in (a, b):
        assert chat(served, "wrong-token-again-0123456789").status_code == 429
    assert chat(b, token).status_code == 200  # a valid token still works from a locked-out address


def test_guessing_the_admin_key_or_the_info_password_on_both_instances_locks_out_on_both(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    info = "info-password-for-scale-01"
    a, b = two(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
        SERVICE_INFO_PASSWORD=info,
    )  # fmt: skip
    for i in range(10):  # the admin guard's limit, split over the two: neither alone reaches it
        wrong = httpx.get(f"{(a, b)[i % 2].url}/admin/api/users", headers={"Authorization": f"Bearer g{i}"}, timeout=10)
        assert wrong.status_code == 401
    for i in range(10):
        httpx.get(f"{(a, b)[i % 2].url}/status", headers={"Authorization": f"Bearer guess-{i}"}, timeout=10)
    time.sleep(0.3)  # the lockouts are announced to every instance
    for served in (a, b):
        locked = httpx.get(f"{served.url}/admin/api/users", headers={"Authorization": "Bearer again"}, timeout=10)
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
        with admin(served) as api:  # the right key still works from a locked-out address
            assert api.get("/users").status_code == 200
        status = httpx.get(f"{served.url}/status", headers={"Authorization": "Bearer guess-again"}, timeout=10)
        assert status.json().get("locked") is True and "usage" not in status.json()
        opened = httpx.get(f"{served.url}/status", headers={"Authorization": f"Bearer {info}"}, timeout=10).json()
        assert "usage" in opened


def test_the_queue_shown_by_each_instance_counts_the_requests_waiting_on_both(
    two: Callable[..., tuple[Served, Served]]
) -> None:
    import socket

    from tests.conftest import PROXY_KEY
    from tests.fakes import FakeOpenAI as Fake

    limited_key = "sk-limited-for-scale-0123456789"
    with Fake({limited_key: KeyBehaviour("rate_limited", reset_s=30)}) as limited:
        a, b = two(OPENAI_KEY=limited_key, OPENAI_BASE_URL=limited.base_url, PROXY_KEY=PROXY_KEY, QUEUE_TIMEOUT="60")
        body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        socks = []
        try:
            for served, count in ((a, 1), (b, 2)):
                host, port = served.url.removeprefix("http://").split(":")
                for _ in range(count):
                    sock = socket.create_connection((host, int(port)), timeout=10)
                    sock.sendall(
                        f"POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                        f"\r\nAuthorization: Bearer {PROXY_KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
                    )
                    socks.append(sock)

            def waiting(served: Served) -> int:
                return httpx.get(f"{served.url}/status", timeout=10).json()["queue"]["openai"].get("gpt-4o", {}).get(
                    "waiting", 0
                )

            deadline = time.monotonic() + 6  # lines are exchanged every second, /status built at most once a second
            while (waiting(a), waiting(b)) != (3, 3) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (waiting(a), waiting(b)) == (3, 3)
            queue = httpx.get(f"{a.url}/status", timeout=10).json()["queue"]["openai"]["gpt-4o"]
            assert 20 <= queue["estimated_wait_s"] <= 31  # the key's lockout (30 s) bounds it
        finally:
            for sock in socks:
                sock.close()
        deadline = time.monotonic() + 6
        while (waiting(a), waiting(b)) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (waiting(a), waiting(b)) == (0, 0)  # a client that left is gone from both views


def test_a_quota_refresh_builds_on_what_the_user_used_through_every_instance(
    two: Callable[..., tuple[Served, Served]], fake_openai: FakeOpenAI
) -> None:
    a, b = two(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
        TOKEN_QUOTA_GPT_4O_MINI="1000",
    )  # fmt: skip
    with admin(a) as api:
        token = api.post("/users", json={"nickname": "eve"}).json()["token"]
        other = api.post("/users", json={"nickname": "tmp", "type": "temporary", "expires_at": time.time() + 3600})
        temporary = other.json()["token"]
    for _ in range(3):  # used through b only: a's copy of the user knows nothing of it
        assert chat(b, token).status_code == 200
    with admin(b) as api:
        used = api.get(f"/users/{token}").json()["token_counts"]["gpt-4o-mini"]
    assert used > 0
    # The schedule's refresh, as instance a runs it at a firing (in a thread, as its loop does).
    a.runtime.owner.quotas.refresh_all()
    for served in (a, b):  # both instances have the new limit at once (b by the announcement)
        deadline = time.monotonic() + 1.0
        with admin(served) as api:
            while (user := api.get(f"/users/{token}").json())["token_limits"] != {"gpt-4o-mini": used + 1000}:
                assert time.monotonic() < deadline, user["token_limits"]
                time.sleep(0.05)
            assert api.get(f"/users/{temporary}").json()["token_limits"] == {"gpt-4o-mini": 1000}  # skipped
    with admin(a) as api:  # the admin's refresh of one user, through either instance
        assert chat(a, token).status_code == 200
        now_used = api.get(f"/users/{token}").json()["token_counts"]["gpt-4o-mini"]
        refreshed = api.post(f"/users/{token}/refresh-quota")
        assert refreshed.status_code == 200 and refreshed.json()["token_limits"] == {"gpt-4o-mini": now_used + 1000}
