"""Self-service temporary tokens for a proof of work: signed single-use challenges, limited per
address, checked with argon2id; the issued token chats through the proxy. The browser half is
in test_pow_browser.py."""

from __future__ import annotations

import secrets
import time

import httpx
import openai
import pytest
from argon2.low_level import Type, hash_secret_raw

from proxy.access.pow import ProofOfWork
from proxy.access.users import UserService
from proxy.config import ConfigError, load_settings
from proxy.server import CLIENT_IP_HEADER, INTERNAL_HEADER
from proxy.store import SQLiteStore
from tests.conftest import PAID, Served, make_settings

ADMIN = "admin-key-for-pow-tests-0001"
# Cheap argon2id parameters and 4 hashes on average: a test solves in well under a second.
POW_ENV = {
    "GATEKEEPER": "user_token",
    "ADMIN_KEY": ADMIN,
    "CAPTCHA_MODE": "proof_of_work",
    "POW_DIFFICULTY_LEVEL": "4",
    "ARGON2_TIME_COST": "2",
    "ARGON2_MEMORY_KB": "64",
}


def solve(challenge: dict) -> str:
    """What the browser does: try random strings until the argon2id hash is at most the target."""
    salt, target = bytes.fromhex(challenge["s"]), int(challenge["d"])
    for _ in range(10_000):
        candidate = secrets.token_hex(8)
        digest = hash_secret_raw(
            candidate.encode(), salt, time_cost=challenge["t"], memory_cost=challenge["m"],
            parallelism=challenge["p"], hash_len=challenge["hl"], type=Type.ID,
        )  # fmt: skip
        if int.from_bytes(digest, "big") <= target:
            return candidate
    raise AssertionError("no solution found")


def wrong_solution(challenge: dict) -> str:
    salt, target = bytes.fromhex(challenge["s"]), int(challenge["d"])
    while True:
        candidate = secrets.token_hex(8)
        digest = hash_secret_raw(
            candidate.encode(), salt, time_cost=challenge["t"], memory_cost=challenge["m"],
            parallelism=challenge["p"], hash_len=challenge["hl"], type=Type.ID,
        )  # fmt: skip
        if int.from_bytes(digest, "big") > target:
            return candidate


def as_visitor(served: Served, ip: str) -> dict[str, str]:
    return {CLIENT_IP_HEADER: ip, INTERNAL_HEADER: served.runtime.internal_secret}


@pytest.fixture
def pow_proxy(proxy_app, fake_openai) -> Served:
    return proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, TOKEN_QUOTA_GPT_4O="5000", **POW_ENV)


def test_a_solved_challenge_issues_a_temporary_token_that_chats_through_the_proxy(pow_proxy: Served) -> None:
    issued = httpx.post(f"{pow_proxy.url}/pow/challenge", json={}).json()
    assert issued["iterations"] == 4 and issued["challenge"]["t"] == 2
    body = {**issued, "solution": solve(issued["challenge"])}
    reply = httpx.post(f"{pow_proxy.url}/pow/verify", json=body)
    assert reply.status_code == 200, reply.text
    token = reply.json()["token"]
    assert abs(reply.json()["expires_at"] - (time.time() + 24 * 3600)) < 60

    client = openai.OpenAI(base_url=pow_proxy.proxy(), api_key=token, max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
    user = httpx.get(f"{pow_proxy.url}/admin/api/users/{token}", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert user["type"] == "temporary" and user["max_ips"] == 2 and user["ips"] == ["127.0.0.1"]
    assert user["token_limits"] == {"gpt-4o": 5000}  # the default quotas

    again = httpx.post(f"{pow_proxy.url}/pow/verify", json=body)
    assert again.status_code == 400 and "already used" in again.json()["error"]["message"]


def test_forged_tampered_foreign_and_wrong_solutions_are_refused(pow_proxy: Served) -> None:
    url = pow_proxy.url
    issued = httpx.post(f"{url}/pow/challenge", json={}).json()
    easier = {**issued["challenge"], "d": str(2**256)}  # any hash would do: the signature no longer fits
    tampered = httpx.post(f"{url}/pow/verify", json={**issued, "challenge": easier, "solution": "x"})
    assert tampered.status_code == 400 and "not issued by this server" in tampered.json()["error"]["message"]
    malformed = httpx.post(f"{url}/pow/verify", json={"challenge": "x", "signature": "y", "solution": "z"})
    assert malformed.status_code == 400
    elsewhere = httpx.post(
        f"{url}/pow/verify",
        json={**issued, "solution": solve(issued["challenge"])},
        headers=as_visitor(pow_proxy, "192.0.2.1"),
    )
    assert elsewhere.status_code == 400 and "address" in elsewhere.json()["error"]["message"]

    wrong = httpx.post(f"{url}/pow/verify", json={**issued, "solution": wrong_solution(issued["challenge"])})
    assert wrong.status_code == 400 and wrong.json()["error"]["message"] == "The solution is wrong."
    fresh = httpx.post(f"{url}/pow/challenge", json={}).json()
    locked = httpx.post(f"{url}/pow/verify", json={**fresh, "solution": solve(fresh["challenge"])})
    assert locked.status_code == 429 and "retry-after" in locked.headers
    assert httpx.get(f"{url}/admin/api/users", headers={"authorization": f"Bearer {ADMIN}"}).json()["users"] == []


def test_challenges_are_limited_per_address_and_expire(proxy_app, fake_openai) -> None:
    served = proxy_app(**POW_ENV, POW_CHALLENGE_TIMEOUT="0.01")  # 0.6 s
    first = httpx.post(f"{served.url}/pow/challenge", json={}).json()
    for _ in range(9):
        assert httpx.post(f"{served.url}/pow/challenge", json={}).status_code == 200
    limited = httpx.post(f"{served.url}/pow/challenge", json={})
    assert limited.status_code == 429 and "Too many challenges" in limited.json()["error"]["message"]
    other = httpx.post(f"{served.url}/pow/challenge", json={}, headers=as_visitor(served, "198.51.100.4"))
    assert other.status_code == 200
    time.sleep(0.8)
    late = httpx.post(f"{served.url}/pow/verify", json={**first, "solution": solve(first["challenge"])})
    assert late.status_code == 400 and "expired" in late.json()["error"]["message"]


def test_proof_of_work_is_off_by_default_and_needs_user_tokens(shared) -> None:
    _, served = shared
    assert httpx.post(f"{served.url}/pow/challenge", json={}).status_code == 404
    assert "proof_of_work" not in httpx.get(f"{served.url}/status").json()
    with pytest.raises(ConfigError, match="CAPTCHA_MODE"):
        load_settings({"CAPTCHA_MODE": "proof_of_work", "PROXY_KEY": "x"}, env_file=None)
    with pytest.raises(ConfigError, match="POW_DIFFICULTY_LEVEL"):
        load_settings({"POW_DIFFICULTY_LEVEL": "impossible"}, env_file=None)


def test_expired_temporary_tokens_are_purged_after_pow_token_purge_hours(tmp_path) -> None:
    now = [1_000_000.0]
    store = SQLiteStore.open(tmp_path)
    users = UserService(store, clock=lambda: now[0])
    pow_ = ProofOfWork(make_settings({**POW_ENV, "POW_TOKEN_PURGE_HOURS": "48"}), users, clock=lambda: now[0])
    old = users.create(type="temporary", expires_at=now[0] - 49 * 3600)
    recent = users.create(type="temporary", expires_at=now[0] - 47 * 3600)
    normal = users.create(nickname="friend")
    assert pow_.purge() == 1
    assert users.get(old.token) is None and users.get(recent.token) and users.get(normal.token)
    pow_.close()
    store.close()
