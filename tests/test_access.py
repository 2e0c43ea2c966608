"""The gatekeeper's rules, with a clock the tests control: who gets in, and how much."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.access import build_access
from proxy.access.gatekeeper import Admission, Caller, Gatekeeper
from proxy.access.users import UserService
from proxy.access.validation import UserError
from proxy.errors import Kind, ProxyError
from proxy.store import SQLiteStore
from proxy.usage import Usage
from tests.conftest import make_settings

ADMIN_KEY = "admin-key-for-tests-123"
HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gatekeeper(tmp_path: Path, clock: Clock, **env: str) -> Gatekeeper:
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY, **env}, tmp_path)
    return build_access(settings, clock).gatekeeper


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refused(call: Callable[..., object], *args: object) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        call(*args)
    return info.value


def request(gk: Gatekeeper, token: str, family: str = "gpt-4o", estimate: int = 10, used: int = 10) -> None:
    """One whole request as the pipeline makes it."""
    admission = gk.admit(gk.identify(token, "10.0.0.1"), family, estimate)
    gk.settle(admission, Usage(used, 0))


# Identity


def test_a_missing_or_unknown_token_is_refused_with_401(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    assert refused(gk.identify, None, "10.0.0.1").status == 401
    error = refused(gk.identify, "not-a-real-token-at-all", "10.0.0.1")
    assert error.status == 401 and error.kind is Kind.AUTHENTICATION


def test_a_known_token_is_identified_by_its_nickname_never_the_token(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    alice = gk.users.create(nickname="alice")
    anonymous = gk.users.create()
    assert gk.identify(alice.token, "10.0.0.1").label == "alice"
    label = gk.identify(anonymous.token, "10.0.0.1").label
    assert anonymous.token not in label and label.startswith("u:")
    assert alice.token not in repr(gk.identify(alice.token, "10.0.0.1"))


def test_tokens_are_random_and_long(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    tokens = {gk.users.create().token for _ in range(50)}
    assert len(tokens) == 50 and all(len(t) >= 32 for t in tokens)  # 24 random bytes, 192 bits


def test_a_disabled_user_is_refused_with_403_and_the_reason(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    bob = gk.users.create(nickname="bob")
    gk.users.update(bob.token, {"disabled": True, "disabled_reason": "shared the token in a public chat"})
    error = refused(gk.identify, bob.token, "10.0.0.1")
    assert error.status == 403 and "shared the token in a public chat" in error.message
    gk.users.update(bob.token, {"disabled": False})
    assert gk.identify(bob.token, "10.0.0.1").label == "bob"


def test_a_temporary_user_is_refused_once_expired(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    guest = gk.users.create(nickname="guest", type="temporary", expires_at=clock.now + HOUR)
    assert gk.identify(guest.token, "10.0.0.1").label == "guest"
    clock.advance(HOUR)
    error = refused(gk.identify, guest.token, "10.0.0.1")
    assert error.status == 403 and "expired" in error.message


def test_a_temporary_user_needs_an_expiry(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    with pytest.raises(UserError, match="expires_at"):
        gk.users.create(type="temporary")


# IP addresses


def test_more_ips_than_allowed_are_refused_with_403(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, MAX_IPS_PER_USER="2")
    carol = gk.users.create(nickname="carol")
    gk.identify(carol.token, "10.0.0.1")
    gk.identify(carol.token, "10.0.0.2")
    gk.identify(carol.token, "10.0.0.1")  # a known IP is always fine
    error = refused(gk.identify, carol.token, "10.0.0.3")
    assert error.status == 403 and "IP" in error.message
    assert not gk.users.get(carol.token).disabled  # without auto-ban, only that IP is refused
    gk.identify(carol.token, "10.0.0.2")


def test_auto_ban_disables_a_user_who_exceeds_the_ip_limit(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, MAX_IPS_PER_USER="1", MAX_IPS_AUTO_BAN="true")
    dave = gk.users.create(nickname="dave")
    gk.identify(dave.token, "10.0.0.1")
    refused(gk.identify, dave.token, "10.0.0.2")
    assert gk.users.get(dave.token).disabled
    error = refused(gk.identify, dave.token, "10.0.0.1")  # now refused everywhere, with the reason
    assert error.status == 403 and "IP addresses" in error.message


def test_a_per_user_ip_limit_overrides_the_global_one(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, MAX_IPS_PER_USER="1")
    roaming = gk.users.create(nickname="roaming", max_ips=3)
    unlimited = gk.users.create(nickname="unlimited", max_ips=0)
    special = gk.users.create(nickname="vip", type="special")
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        gk.identify(roaming.token, ip)
    assert refused(gk.identify, roaming.token, "10.0.0.4").status == 403
    for i in range(20):
        gk.identify(unlimited.token, f"10.1.0.{i}")
        gk.identify(special.token, f"10.2.0.{i}")


# Quotas


def test_a_user_out_of_quota_for_a_family_gets_a_402_clients_do_not_retry(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    erin = gk.users.create(nickname="erin", token_limits={"gpt-4o": 100})
    request(gk, erin.token, "gpt-4o", estimate=10, used=95)
    error = refused(gk.admit, gk.identify(erin.token, "10.0.0.1"), "gpt-4o", 10)
    assert error.status == 402 and error.kind is Kind.QUOTA and "quota" in error.message.lower()
    assert error.headers["x-should-retry"] == "false" and error.code == "quota_exceeded"
    request(gk, erin.token, "gpt-4o", estimate=5, used=5)
    spent = refused(gk.admit, gk.identify(erin.token, "10.0.0.1"), "gpt-4o", 1)
    assert spent.status == 402 and "spent: 100 of 100" in spent.message
    request(gk, erin.token, "gpt-5", estimate=5000, used=5000)  # other families are unlimited


def test_special_users_and_zero_limits_are_unlimited(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    vip = gk.users.create(nickname="vip", type="special", token_limits={"gpt-4o": 10})
    zero = gk.users.create(nickname="zero", token_limits={"gpt-4o": 0})
    for _ in range(3):
        request(gk, vip.token, estimate=100, used=100)
        request(gk, zero.token, estimate=100, used=100)
    assert gk.users.get(vip.token).token_counts == {"gpt-4o": 300}


def test_twenty_concurrent_requests_on_a_quota_for_one_admit_exactly_one(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    frank = gk.users.create(nickname="frank", token_limits={"gpt-4o": 150})
    caller = gk.identify(frank.token, "10.0.0.1")
    admitted: list[Admission] = []
    statuses: list[int] = []
    barrier = threading.Barrier(20)

    def attempt() -> None:
        barrier.wait()
        try:
            admitted.append(gk.admit(caller, "gpt-4o", 100))
        except ProxyError as exc:
            statuses.append(exc.status)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 1 and statuses == [429] * 19

    gk.settle(admitted[0], Usage(tokens_in=40, tokens_out=23))
    assert gk.users.get(frank.token).token_counts == {"gpt-4o": 63}
    assert gk.users.get(frank.token).prompt_count == 1
    assert gk.reserved(frank, "gpt-4o") == 0


async def test_twenty_requests_racing_on_the_event_loop_admit_exactly_one(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    gina = gk.users.create(nickname="gina", token_limits={"claude-sonnet": 150})

    async def one() -> int:
        caller = gk.identify(gina.token, "10.0.0.1")
        try:
            admission = gk.admit(caller, "claude-sonnet", 100)
        except ProxyError as exc:
            return exc.status
        await asyncio.sleep(0.05)  # upstream latency: the others arrive meanwhile
        gk.settle(admission, Usage(30, 20))
        return 200

    statuses = await asyncio.gather(*(one() for _ in range(20)))
    assert sorted(statuses) == [200] + [429] * 19
    assert gk.users.get(gina.token).token_counts == {"claude-sonnet": 50}


def test_a_released_request_gives_its_reservation_back_and_counts_nothing(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    hank = gk.users.create(nickname="hank", token_limits={"gpt-4o": 100})
    caller = gk.identify(hank.token, "10.0.0.1")
    first = gk.admit(caller, "gpt-4o", 80)
    refused(gk.admit, caller, "gpt-4o", 80)
    gk.release(first)
    gk.release(first)  # twice is harmless
    second = gk.admit(caller, "gpt-4o", 80)
    gk.settle(second, Usage(10, 10))
    gk.settle(second, Usage(10, 10))  # counted once
    user = gk.users.get(hank.token)
    assert user.token_counts == {"gpt-4o": 20} and user.prompt_count == 1


def test_counts_are_exact_and_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, tmp_path)
    access = build_access(settings, clock)
    ivy = access.users.create(nickname="ivy", token_limits={"gpt-4o": 1000})
    for used in (10, 20, 30):
        request(access.gatekeeper, ivy.token, "gpt-4o", estimate=50, used=used)
    request(access.gatekeeper, ivy.token, "claude-opus", estimate=50, used=7)
    access.store.close()

    again = build_access(settings, clock)
    user = again.users.get(ivy.token)
    assert user.token_counts == {"gpt-4o": 60, "claude-opus": 7}
    assert user.prompt_count == 4 and user.ips == ["10.0.0.1"] and user.last_used_at == clock.now
    again.store.close()


def test_a_failed_write_does_not_fail_the_request_and_counts_stay_enforced(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, tmp_path)
    access = build_access(settings, clock)
    quinn = access.users.create(nickname="quinn", token_limits={"gpt-4o": 100})
    access.store.close()  # the disk goes away
    request(access.gatekeeper, quinn.token, estimate=60, used=60)
    assert "could not save quinn" in caplog.text
    assert refused(access.gatekeeper.admit, access.gatekeeper.identify(quinn.token, "10.0.0.1"), "gpt-4o", 60)


@pytest.mark.parametrize(("period", "length"), [("hourly", HOUR), ("daily", 24 * HOUR)])
def test_a_period_boundary_alone_never_zeroes_counts(tmp_path: Path, period: str, length: float) -> None:
    # Issue 16: quotas are topped up by the scheduled refresh (tests/test_refresh.py), as the Node
    # original does, not refilled by zeroing counts when a request crosses a period boundary.
    clock = Clock(1_750_000_000.0 - 1_750_000_000.0 % length + 10)  # 10 s into a period
    gk = gatekeeper(tmp_path, clock, QUOTA_REFRESH_PERIOD=period)
    jo = gk.users.create(nickname="jo", token_limits={"gpt-4o": 100})
    request(gk, jo.token, estimate=100, used=100)
    clock.advance(length)  # into the next period
    assert refused(gk.admit, gk.identify(jo.token, "10.0.0.1"), "gpt-4o", 1).status == 402
    assert gk.users.get(jo.token).token_counts == {"gpt-4o": 100}


def test_without_a_refresh_period_quotas_never_refill(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    kim = gk.users.create(nickname="kim", token_limits={"gpt-4o": 100})
    request(gk, kim.token, estimate=100, used=100)
    clock.advance(400 * 24 * HOUR)
    assert refused(gk.admit, gk.identify(kim.token, "10.0.0.1"), "gpt-4o", 1).status == 402


# Rate limits


def test_more_requests_a_minute_than_allowed_get_429_with_rate_limit_headers(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, TEXT_MODEL_RATE_LIMIT="3")
    leo = gk.users.create(nickname="leo")
    caller = gk.identify(leo.token, "10.0.0.1")
    first = gk.admit(caller, "gpt-4o", 1)
    assert first.headers["X-RateLimit-Limit"] == "3" and first.headers["X-RateLimit-Remaining"] == "2"
    clock.advance(20)
    gk.admit(caller, "gpt-4o", 1)
    gk.admit(caller, "claude-sonnet", 1)
    error = refused(gk.admit, caller, "gpt-4o", 1)
    assert error.status == 429 and error.kind is Kind.RATE_LIMIT
    assert error.headers["Retry-After"] == "40"  # when the first request leaves the window
    assert error.headers["X-RateLimit-Limit"] == "3"
    assert error.headers["X-RateLimit-Remaining"] == "0"
    assert error.headers["X-RateLimit-Reset"] == "40"
    clock.advance(40)
    gk.admit(caller, "gpt-4o", 1)


def test_the_rate_limit_is_per_user_and_spares_special_users(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, TEXT_MODEL_RATE_LIMIT="1")
    mia, ned = gk.users.create(nickname="mia"), gk.users.create(nickname="ned")
    vip = gk.users.create(nickname="vip", type="special")
    gk.admit(gk.identify(mia.token, "10.0.0.1"), "gpt-4o", 1)
    gk.admit(gk.identify(ned.token, "10.0.0.1"), "gpt-4o", 1)  # same IP, another user
    assert refused(gk.admit, gk.identify(mia.token, "10.0.0.1"), "gpt-4o", 1).status == 429
    for _ in range(10):
        gk.admit(gk.identify(vip.token, "10.0.0.1"), "gpt-4o", 1)
    gk.admit(gk.identify(mia.token, "10.0.0.1"), None)  # not a model request: never limited


def test_twenty_concurrent_requests_on_a_rate_limit_of_one_admit_exactly_one(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, TEXT_MODEL_RATE_LIMIT="1")
    pat = gk.users.create(nickname="pat")
    caller = gk.identify(pat.token, "10.0.0.1")
    outcomes: list[int] = []
    barrier = threading.Barrier(20)

    def attempt() -> None:
        barrier.wait()
        try:
            gk.admit(caller, "gpt-4o", 1)
            outcomes.append(200)
        except ProxyError as exc:
            outcomes.append(exc.status)

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [200] + [429] * 19


@pytest.mark.parametrize("mode", ["none", "proxy_key"])
def test_without_user_tokens_the_rate_limit_is_per_ip(tmp_path: Path, clock: Clock, mode: str) -> None:
    env = {"GATEKEEPER": mode, "PROXY_KEY": "pk-test-proxy-key-42", "TEXT_MODEL_RATE_LIMIT": "2"}
    gk = Gatekeeper(make_settings(env, tmp_path), clock=clock)
    credential = "pk-test-proxy-key-42" if mode == "proxy_key" else None
    here, there = gk.identify(credential, "10.0.0.1"), gk.identify(credential, "10.0.0.2")
    gk.admit(here, "gpt-4o")
    gk.admit(here, "gpt-4o")
    gk.admit(there, "gpt-4o")
    assert refused(gk.admit, here, "gpt-4o").status == 429


def test_a_rate_limit_of_zero_means_no_limit(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock)
    olga = gk.users.create(nickname="olga")
    for _ in range(500):
        admission = gk.admit(gk.identify(olga.token, "10.0.0.1"), "gpt-4o", 1)
    assert admission.headers == {}


# The other modes, unchanged


def test_proxy_key_mode_accepts_only_the_proxy_key(tmp_path: Path) -> None:
    gk = Gatekeeper(make_settings({"PROXY_KEY": "pk-test-proxy-key-42"}, tmp_path))
    assert gk.identify("pk-test-proxy-key-42", "10.0.0.1") == Caller(label="proxy-key", ip="10.0.0.1")
    assert refused(gk.identify, "pk-test-proxy-key-43", "10.0.0.1").status == 401
    assert refused(gk.identify, None, "10.0.0.1").status == 401
    admission = gk.admit(gk.identify("pk-test-proxy-key-42", "1.2.3.4"), "gpt-4o", 10**9)
    gk.settle(admission, Usage(10**9, 0))


def test_user_token_mode_needs_users(tmp_path: Path) -> None:
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, tmp_path)
    with pytest.raises(ValueError, match="UserService"):
        Gatekeeper(settings)
    assert Gatekeeper(settings, users=UserService(SQLiteStore(":memory:"))).mode == "user_token"


# IP limit: networks (IPv6 by /64) seen within a window


def test_a_phone_changing_ipv6_addresses_within_its_slash_64_counts_once(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, MAX_IPS_PER_USER="2", MAX_IPS_AUTO_BAN="true")
    phone = gk.users.create(nickname="phone")
    for n in range(50):  # privacy addresses: a new one every few minutes, all in one /64
        gk.identify(phone.token, f"2001:db8:aa:bb:{n:x}::1")
    gk.identify(phone.token, "198.51.100.7")
    assert refused(gk.identify, phone.token, "2001:db8:cc:dd::1").status == 403
    assert gk.users.get(phone.token).disabled


def test_only_networks_seen_within_the_window_count_against_the_ip_limit(tmp_path: Path, clock: Clock) -> None:
    gk = gatekeeper(tmp_path, clock, MAX_IPS_PER_USER="2", MAX_IPS_WINDOW_HOURS="24", MAX_IPS_AUTO_BAN="true")
    traveller = gk.users.create(nickname="traveller")
    gk.identify(traveller.token, "198.51.100.1")
    gk.identify(traveller.token, "198.51.100.2")
    assert refused(gk.identify, traveller.token, "198.51.100.3").status == 403
    gk.users.update(traveller.token, {"disabled": False})
    clock.advance(12 * HOUR)
    gk.identify(traveller.token, "198.51.100.2")  # still in use: stays counted
    clock.advance(13 * HOUR)  # .1 last seen 25 h ago, .2 13 h ago
    gk.identify(traveller.token, "198.51.100.3")
    assert refused(gk.identify, traveller.token, "198.51.100.4").status == 403
