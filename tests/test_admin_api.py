"""The admin API and `/proxy/me`, over real HTTP on loopback."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from proxy.access import Access, build_access
from proxy.admin import admin_router, me_router
from proxy.usage import Usage, UsageEvent, UsageLedger
from tests.conftest import make_settings, serve

ADMIN_KEY = "admin-key-for-tests-123"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Admin:
    http: httpx.Client
    access: Access
    ledger: UsageLedger
    clock: Clock
    rechecks: list[str]


def start(tmp_path: Path, data: str = "data", **env: str) -> Iterator[Admin]:
    clock = Clock()
    settings = make_settings(
        {"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY, "DATA_DIR": str(tmp_path / data), **env}
    )
    access = build_access(settings, clock)
    ledger = UsageLedger(sink=access.store.add_usage)
    ledger.restore(*access.store.usage_totals())
    rechecks: list[str] = []

    async def recheck() -> None:
        rechecks.append("all keys")

    app = FastAPI()
    router = admin_router(
        access.users, admin_key=ADMIN_KEY, store=access.store, ledger=ledger, recheck=recheck, clock=clock
    )
    app.include_router(router, prefix="/admin/api")
    app.include_router(me_router(access.gatekeeper, clock=clock))
    with serve(app, settings) as served, httpx.Client(base_url=served.url, timeout=10) as http:
        yield Admin(http, access, ledger, clock, rechecks)
    access.store.close()


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    yield from start(tmp_path)


def create(admin: Admin, **body: object) -> dict:
    response = admin.http.post("/admin/api/users", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_then_list_then_get_a_user(admin: Admin) -> None:
    alice = create(admin, nickname="alice", token_limits={"gpt-4o": 100000}, max_ips=3)
    assert len(alice["token"]) >= 32 and alice["nickname"] == "alice" and alice["type"] == "normal"
    assert alice["token_limits"] == {"gpt-4o": 100000} and alice["max_ips"] == 3
    assert alice["token_counts"] == {} and alice["prompt_count"] == 0 and alice["ips"] == []
    assert alice["created_at"] == admin.clock.now and alice["disabled"] is False
    for name in ("last_used_at", "disabled_reason", "expires_at"):
        assert alice[name] is None

    listed = admin.http.get("/admin/api/users", headers=AUTH).json()
    assert [u["nickname"] for u in listed["users"]] == ["alice"]
    assert admin.http.get(f"/admin/api/users/{alice['token']}", headers=AUTH).json() == alice
    assert admin.http.get("/admin/api/users/no-such-token-000000", headers=AUTH).status_code == 404


def test_an_empty_body_creates_a_plain_user(admin: Admin) -> None:
    response = admin.http.post("/admin/api/users", headers=AUTH)
    assert response.status_code == 201 and response.json()["type"] == "normal"


def test_a_temporary_user_takes_an_iso_date_or_seconds(admin: Admin) -> None:
    guest = create(admin, type="temporary", expires_at="2030-01-01T00:00:00Z")
    assert guest["expires_at"] == 1893456000.0
    other = create(admin, type="temporary", expires_at=1893456000)
    assert other["expires_at"] == 1893456000.0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "superuser"}, "type must be one of"),
        ({"type": "temporary"}, "expires_at"),
        ({"token_limits": {"gpt-4o": -5}}, "token_limits.gpt-4o"),
        ({"token_limits": {"gtp-4o": 5}}, "unknown model family 'gtp-4o'"),
        ({"max_ips": "three"}, "max_ips"),
        ({"expires_at": "next tuesday"}, "expires_at"),
        ({"nickname": "x" * 81}, "nickname"),
        ({"token": "i-choose-my-own-token"}, "Unknown field 'token'"),
    ],
)
def test_invalid_fields_are_refused_with_400_and_a_clear_message(admin: Admin, body: dict, message: str) -> None:
    response = admin.http.post("/admin/api/users", json=body, headers=AUTH)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_a_body_that_is_not_json_is_refused_with_400(admin: Admin) -> None:
    response = admin.http.post("/admin/api/users", content=b"{nope", headers=AUTH)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_patch_changes_only_the_fields_given(admin: Admin) -> None:
    bob = create(admin, nickname="bob", token_limits={"gpt-4o": 10})
    url = f"/admin/api/users/{bob['token']}"
    patched = admin.http.patch(url, json={"nickname": "robert", "token_limits": {"claude-sonnet": 50}}, headers=AUTH)
    assert patched.status_code == 200
    assert patched.json()["nickname"] == "robert" and patched.json()["token_limits"] == {"claude-sonnet": 50}
    assert patched.json()["type"] == "normal"
    assert admin.http.patch(url, json={"prompt_count": 0}, headers=AUTH).status_code == 400
    assert admin.http.patch("/admin/api/users/no-such-token-000000", json={}, headers=AUTH).status_code == 404


def test_disabling_a_user_locks_them_out_and_enabling_clears_the_reason(admin: Admin) -> None:
    carol = create(admin, nickname="carol")
    url = f"/admin/api/users/{carol['token']}"
    disabled = admin.http.patch(url, json={"disabled": True, "disabled_reason": "too many requests"}, headers=AUTH)
    assert disabled.json()["disabled"] is True and disabled.json()["disabled_reason"] == "too many requests"
    gk = admin.access.gatekeeper
    with pytest.raises(Exception, match="too many requests"):
        gk.identify(carol["token"], "10.0.0.1")
    enabled = admin.http.patch(url, json={"disabled": False}, headers=AUTH).json()
    assert enabled["disabled"] is False and enabled["disabled_reason"] is None
    assert gk.identify(carol["token"], "10.0.0.1").label == "carol"


def test_delete_removes_the_user_and_their_access(admin: Admin) -> None:
    dave = create(admin, nickname="dave")
    url = f"/admin/api/users/{dave['token']}"
    assert admin.http.delete(url, headers=AUTH).status_code == 204
    assert admin.http.get(url, headers=AUTH).status_code == 404
    assert admin.http.delete(url, headers=AUTH).status_code == 404
    with pytest.raises(Exception, match="not valid"):
        admin.access.gatekeeper.identify(dave["token"], "10.0.0.1")


def test_export_then_import_restores_users_and_usage_on_another_proxy(admin: Admin, tmp_path: Path) -> None:
    erin = create(admin, nickname="erin", token_limits={"gpt-4o": 1000})
    gk = admin.access.gatekeeper
    admission = gk.admit(gk.identify(erin["token"], "10.0.0.9"), "gpt-4o", 50)
    gk.settle(admission, Usage(30, 12))
    admin.ledger.record(UsageEvent(1.0, "openai", "gpt-4o", "gpt-4o", False, 30, 12, 5.0, 200, key_id="oai-1"))
    export = admin.http.get("/admin/api/export", headers=AUTH).json()
    assert export["usage"]["by_family"] == {"gpt-4o": {"requests": 1, "tokens_in": 30, "tokens_out": 12}}

    other = start(tmp_path, "other")
    fresh = next(other)
    try:
        response = fresh.http.post("/admin/api/import", json=export, headers=AUTH)
        assert response.status_code == 200 and response.json() == {"imported": 1}
        user = fresh.http.get(f"/admin/api/users/{erin['token']}", headers=AUTH).json()
        assert user["token_counts"] == {"gpt-4o": 42} and user["prompt_count"] == 1 and user["ips"] == ["10.0.0.9"]
        assert fresh.ledger.snapshot()["by_family"]["gpt-4o"]["tokens_in"] == 30
        again = fresh.http.get("/admin/api/export", headers=AUTH).json()
        assert again["users"] == export["users"] and again["usage"] == export["usage"]
    finally:
        other.close()


def test_an_import_with_one_bad_user_imports_nothing(admin: Admin) -> None:
    good = {"token": "imported-token-0123456789", "nickname": "good"}
    bad = {"token": "short"}
    response = admin.http.post("/admin/api/import", json={"users": [good, bad]}, headers=AUTH)
    assert response.status_code == 400 and "users[1]" in response.json()["error"]["message"]
    assert admin.http.get("/admin/api/users", headers=AUTH).json() == {"users": []}


def test_key_recheck_is_accepted_and_started(admin: Admin) -> None:
    response = admin.http.post("/admin/api/keys/recheck", headers=AUTH)
    assert response.status_code == 202
    for _ in range(50):
        if admin.rechecks:
            break
        time.sleep(0.02)
    assert admin.rechecks == ["all keys"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"x-api-key": "wrong-key"}])
def test_every_admin_route_needs_the_admin_key(admin: Admin, headers: dict) -> None:
    for method, path in [
        ("GET", "/admin/api/users"),
        ("POST", "/admin/api/users"),
        ("GET", "/admin/api/export"),
        ("POST", "/admin/api/import"),
        ("POST", "/admin/api/keys/recheck"),
        ("DELETE", "/admin/api/users/anything-at-all-000"),
    ]:
        response = admin.http.request(method, path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert "admin key" in response.json()["error"]["message"]


def test_a_client_that_keeps_guessing_is_locked_out_but_the_right_key_still_works(admin: Admin) -> None:
    for _ in range(10):
        assert admin.http.get("/admin/api/users", headers={"Authorization": "Bearer guess"}).status_code == 401
    locked = admin.http.get("/admin/api/users", headers={"Authorization": "Bearer guess"})
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    assert admin.http.get("/admin/api/users", headers=AUTH).status_code == 200
    admin.clock.now += 301
    assert admin.http.get("/admin/api/users", headers={"Authorization": "Bearer guess"}).status_code == 401


def test_a_few_typos_do_not_lock_the_admin_out(admin: Admin) -> None:
    for _ in range(3):
        for _ in range(9):
            admin.http.get("/admin/api/users", headers={"Authorization": "Bearer typo"})
        assert admin.http.get("/admin/api/users", headers=AUTH).status_code == 200


def test_logs_never_show_a_user_token_or_the_admin_key(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    access_log = logging.getLogger("uvicorn.access")  # uvicorn's access log does not propagate
    access_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG), caplog.at_level(logging.INFO, logger="uvicorn.access"):
            frank = create(admin, nickname="frank")
            admin.http.patch(f"/admin/api/users/{frank['token']}", json={"disabled": True}, headers=AUTH)
            admin.http.get("/admin/api/users", headers={"Authorization": "Bearer wrong"})
            admin.http.delete(f"/admin/api/users/{frank['token']}", headers=AUTH)
    finally:
        access_log.removeHandler(caplog.handler)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("proxy", "uvicorn")))
    assert "frank" in ours and f"/admin/api/users/{frank['token'][:6]}…" in ours  # uvicorn's line, masked
    assert frank["token"] not in ours and ADMIN_KEY not in ours


# /proxy/me


def test_a_friend_sees_their_own_usage_and_quota_left_with_the_token_masked(admin: Admin) -> None:
    gina = create(admin, nickname="gina", token_limits={"gpt-4o": 1000, "claude-sonnet": 500})
    gk = admin.access.gatekeeper
    gk.settle(gk.admit(gk.identify(gina["token"], "10.0.0.1"), "gpt-4o", 100), Usage(200, 50))
    running = gk.admit(gk.identify(gina["token"], "10.0.0.1"), "gpt-4o", 100)

    for headers in ({"Authorization": f"Bearer {gina['token']}"}, {"x-api-key": gina["token"]}):
        me = admin.http.get("/proxy/me", headers=headers)
        assert me.status_code == 200
        body = me.json()
        assert body["token"] == gina["token"][:6] + "…" and gina["token"] not in me.text
        assert body["nickname"] == "gina" and body["prompt_count"] == 1
        assert body["quota"]["gpt-4o"] == {"limit": 1000, "used": 250, "in_progress": 100, "remaining": 650}
        assert body["quota"]["claude-sonnet"]["remaining"] == 500
        assert "ips" not in body and body["ip_count"] == 1
    gk.release(running)


def test_proxy_me_refuses_an_unknown_token(admin: Admin) -> None:
    assert admin.http.get("/proxy/me").status_code == 401
    assert admin.http.get("/proxy/me", headers={"Authorization": "Bearer nobody-0123456789"}).status_code == 401
    assert admin.http.get("/proxy/me", headers=AUTH).status_code == 401  # the admin key is not a user
