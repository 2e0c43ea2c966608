"""Quota refresh like the Node original: QUOTA_REFRESH_PERIOD (hourly, daily or cron) tops each
user's limit up to used + the family's default, temporary users skipped; the admin can refresh
one user or reset everyone's counts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from proxy.access.refresh import QuotaRefresher, next_fire
from proxy.access.users import UserService
from proxy.config import ConfigError, load_settings
from proxy.store import SQLiteStore
from tests.conftest import PAID
from tests.fakes import FakeOpenAI

ADMIN = "admin-key-for-refresh-tests-1"
T0 = datetime(2026, 11, 29, 16, 50, tzinfo=UTC).timestamp()


def test_refresh_periods_are_hourly_daily_or_cron_in_utc() -> None:
    assert next_fire("hourly", T0) == datetime(2026, 11, 29, 17, 0, tzinfo=UTC).timestamp()
    assert next_fire("daily", T0) == datetime(2026, 11, 30, 0, 0, tzinfo=UTC).timestamp()
    assert next_fire("30 6 * * 1", T0) == datetime(2026, 11, 30, 6, 30, tzinfo=UTC).timestamp()  # Monday 06:30
    assert next_fire("", T0) is None
    assert load_settings({"QUOTA_REFRESH_PERIOD": "*/15 * * * *"}, env_file=None).quota_refresh_period
    for bad in ("weekly", "61 * * * *", "* * * *"):
        with pytest.raises(ConfigError, match="QUOTA_REFRESH_PERIOD"):
            load_settings({"QUOTA_REFRESH_PERIOD": bad}, env_file=None)


def test_refresh_tops_limits_up_by_the_family_default_and_skips_temporary_users(tmp_path: Path) -> None:
    store = SQLiteStore.open(tmp_path)
    users = UserService(store, clock=lambda: T0)
    ann = users.create(nickname="ann", token_limits={"gpt-4o": 1000, "claude-sonnet": 50})
    users.charge(ann, "gpt-4o", 700)
    temp = users.create(type="temporary", expires_at=T0 + 3600, token_limits={"gpt-4o": 1000})
    users.charge(temp, "gpt-4o", 900)
    refresher = QuotaRefresher(users, {"gpt-4o": 1000, "gpt-4o-mini": 0}, "daily")

    assert refresher.refresh_all() == 1
    assert users.get(ann.token).token_limits == {"gpt-4o": 1700, "claude-sonnet": 50}  # used + default
    assert users.get(ann.token).token_counts == {"gpt-4o": 700}  # counts are kept
    assert users.get(temp.token).token_limits == {"gpt-4o": 1000}
    store.close()
    reopened = UserService(SQLiteStore.open(tmp_path))
    assert reopened.get(ann.token).token_limits["gpt-4o"] == 1700  # saved


def test_the_schedule_refreshes_at_each_firing(tmp_path: Path) -> None:
    now = [T0]
    users = UserService(SQLiteStore.open(tmp_path), clock=lambda: now[0])
    bo = users.create(nickname="bo", token_limits={"gpt-4o": 10})
    fired: list[float] = []

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        fired.append(now[0])
        if len(fired) == 3:
            raise asyncio.CancelledError

    refresher = QuotaRefresher(users, {"gpt-4o": 10}, "hourly", clock=lambda: now[0], sleep=sleep)
    users.charge(bo, "gpt-4o", 10)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(refresher.run())
    assert [datetime.fromtimestamp(t, UTC).strftime("%H:%M") for t in fired] == ["17:00", "18:00", "19:00"]
    assert users.get(bo.token).token_limits == {"gpt-4o": 20}


def test_admin_resets_every_users_counts_and_refreshes_one_user(proxy_app, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
        TOKEN_QUOTA_GPT_4O="60",
    )  # fmt: skip
    admin = httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})
    token = admin.post("/users", json={"nickname": "cy"}).json()["token"]
    assert admin.get(f"/users/{token}").json()["token_limits"] == {"gpt-4o": 60}  # the family default

    def ask() -> httpx.Response:
        return httpx.post(
            f"{served.proxy()}/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            headers={"authorization": f"Bearer {token}"},
        )

    while ask().status_code == 200:
        pass
    spent = ask()
    assert spent.status_code == 402 and "quota" in spent.json()["error"]["message"].lower()
    assert admin.post("/quotas/reset-all").json() == {"reset": 1}
    assert admin.get(f"/users/{token}").json()["token_counts"] == {}
    assert ask().status_code == 200

    used = admin.get(f"/users/{token}").json()["token_counts"]["gpt-4o"]
    refreshed = admin.post(f"/users/{token}/refresh-quota")
    assert refreshed.status_code == 200 and refreshed.json()["token_limits"] == {"gpt-4o": used + 60}
    assert admin.get(f"/users/{token}").json()["token_limits"] == {"gpt-4o": used + 60}
    assert admin.post("/users/nobody/refresh-quota").status_code == 404
