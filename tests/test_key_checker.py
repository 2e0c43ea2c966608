"""The key checker, against fake upstreams on loopback: what it learns about each kind of key,
what its checks cost, how fast and how gently it checks, and when it checks again."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Settings, load_settings
from proxy.keys.checker import KeyChecker
from proxy.keys.pool import KeyPool, KeyState
from proxy.pipeline import Service
from proxy.providers.anthropic.dialect import Anthropic
from proxy.providers.openai.dialect import OpenAI
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour, openai_error

KINDS = ["paid", "trial", "revoked", "over_quota", "rate_limited", "flaky", "server_error", "slow_rate_limited"]


def secret(kind: str, n: int = 0, service: str = "openai") -> str:
    return f"sk-{'ant-' if service == 'anthropic' else ''}{kind}-{n:04d}-0123456789"


def settings(**env: str) -> Settings:
    return load_settings({"KEY_CHECK_INTERVAL": "3600", "KEY_CHECK_CONCURRENCY": "16", **env}, env_file=None)


def openai_service(base_url: str, secrets: list[str]) -> Service:
    return Service(OpenAI(), base_url, KeyPool("openai", secrets, "oai-"), "OPENAI_KEY")


def anthropic_service(base_url: str, secrets: list[str]) -> Service:
    return Service(Anthropic(), base_url, KeyPool("anthropic", secrets, "ant-"), "ANTHROPIC_KEY")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def checker_for(services: dict[str, Service], session: aiohttp.ClientSession, **kw: Any) -> KeyChecker:
    env = kw.pop("env", {})
    return KeyChecker(services, lambda: session, settings(**env), **kw)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def status_by_secret(service: Service) -> dict[str, str]:
    now = time.time()
    return {k.secret: k.status(now) for k in service.pool.keys}


class Timeline:
    """A clock and a sleep the test controls: each sleep waits for `release()`, then time moves on."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []
        self._gate: asyncio.Queue[None] = asyncio.Queue()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        await self._gate.get()
        self.now += delay

    def release(self) -> None:
        self._gate.put_nowait(None)


class CountingOpenAI(FakeOpenAI):
    """FakeOpenAI that answers after `delay` and counts requests in flight at once."""

    def __init__(self, *args: Any, delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.billing_inactive: set[str] = set()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if request.headers.get("authorization", "")[7:] in self.billing_inactive and request.method == "POST":
                message = "Your account is not active, please check your billing details."
                return self._json(openai_error(message, "billing_not_active"), 429)
            return await super()._dispatch(request)
        finally:
            with self._lock:
                self.in_flight -= 1


@contextmanager
def closed_port_url() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    yield f"http://127.0.0.1:{port}/v1"


# What a check learns -------------------------------------------------------------------------
async def test_a_check_tells_every_kind_of_openai_key_apart(session: aiohttp.ClientSession) -> None:
    keys = {secret(kind): KeyBehaviour(kind) for kind in KINDS}
    keys[secret("paid", 1)] = KeyBehaviour("paid", models=["gpt-4o-mini"])
    with FakeOpenAI(keys) as fake:
        service = openai_service(fake.base_url, list(keys))
        await checker_for({"openai": service}, session).check_all()
    assert status_by_secret(service) == {
        secret("paid"): "active",
        secret("paid", 1): "active",
        secret("trial"): "active",
        secret("revoked"): "revoked",
        secret("over_quota"): "over_quota",
        secret("rate_limited"): "rate_limited",
        secret("slow_rate_limited"): "rate_limited",
        secret("flaky"): "active",
        secret("server_error"): "unchecked",  # its check failed: it will be checked again soon
    }
    by = {k.secret: k for k in service.pool.keys}
    assert by[secret("trial")].tier == "trial"
    assert by[secret("paid")].tier == "paid"
    assert by[secret("trial")].limits == {"requests": 3, "tokens": 40_000}
    assert by[secret("paid")].limits == {"requests": 5000, "tokens": 800_000}
    assert by[secret("paid")].models == set(FakeOpenAI.DEFAULT_MODELS)
    assert by[secret("paid", 1)].models == {"gpt-4o-mini"}
    slow = by[secret("slow_rate_limited")].locked_until - time.time()
    assert 80 < slow <= 90


async def test_a_check_tells_every_kind_of_claude_key_apart(session: aiohttp.ClientSession) -> None:
    keys = {secret(kind, service="anthropic"): KeyBehaviour(kind) for kind in KINDS}
    with FakeAnthropic(keys) as fake:
        service = anthropic_service(fake.base_url, list(keys))
        await checker_for({"anthropic": service}, session).check_all()
    statuses = status_by_secret(service)
    assert {kind: statuses[secret(kind, service="anthropic")] for kind in KINDS} == {
        "paid": "active",
        "trial": "active",
        "revoked": "revoked",
        "over_quota": "over_quota",
        "rate_limited": "rate_limited",
        "flaky": "active",
        "server_error": "unchecked",
        "slow_rate_limited": "rate_limited",
    }
    paid, trial = service.pool.keys[0], service.pool.keys[1]
    assert (paid.tier, trial.tier) == ("paid", "trial")
    assert trial.limits["requests"] == 5 and paid.limits["requests"] == 4000
    assert paid.models == set(FakeAnthropic.DEFAULT_MODELS)


@pytest.mark.parametrize(("rpm", "tier"), [(3, "trial"), (250, "trial"), (251, "paid"), (10_000, "paid")])
async def test_a_key_allowed_at_most_250_requests_a_minute_is_a_trial_key(
    session: aiohttp.ClientSession, rpm: int, tier: str
) -> None:
    with FakeOpenAI({"sk-k-0123456789": KeyBehaviour("paid", rpm=rpm)}) as fake:
        service = openai_service(fake.base_url, ["sk-k-0123456789"])
        await checker_for({"openai": service}, session).check_all()
    assert service.pool.keys[0].tier == tier
    assert service.pool.snapshot()["trial"] == (tier == "trial")


async def test_a_key_whose_billing_is_not_active_is_over_quota(session: aiohttp.ClientSession) -> None:
    with CountingOpenAI({"sk-k-0123456789": KeyBehaviour("paid")}) as fake:
        fake.billing_inactive.add("sk-k-0123456789")
        service = openai_service(fake.base_url, ["sk-k-0123456789"])
        await checker_for({"openai": service}, session).check_all()
    assert service.pool.keys[0].state is KeyState.OVER_QUOTA


# What a check costs ---------------------------------------------------------------------------
async def test_an_openai_check_costs_the_key_owner_nothing(session: aiohttp.ClientSession) -> None:
    keys = {secret(kind): KeyBehaviour(kind) for kind in ("paid", "trial", "over_quota")}
    with FakeOpenAI(keys) as fake:
        service = openai_service(fake.base_url, list(keys))
        await checker_for({"openai": service}, session).check_all()
        calls = [(r.method, r.path, r.key, r.json) for r in fake.requests]
    assert len(calls) == 2 * len(keys)
    for key in keys:
        mine = [(m, p, body) for m, p, k, body in calls if k == key]
        assert [(m, p) for m, p, _ in mine] == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
        probe = mine[1][2]
        assert probe["max_tokens"] == 0  # refused as invalid: nothing is generated, nothing billed
        assert probe["model"] == "gpt-4o-mini" and not probe.get("stream")


async def test_a_claude_check_asks_for_one_token_from_the_cheapest_model(session: aiohttp.ClientSession) -> None:
    keys = {secret(kind, service="anthropic"): KeyBehaviour(kind) for kind in ("paid", "over_quota")}
    with FakeAnthropic(keys) as fake:
        service = anthropic_service(fake.base_url, list(keys))
        await checker_for({"anthropic": service}, session).check_all()
        calls = [(r.method, r.path.split("?")[0], r.json) for r in fake.requests]
    assert sorted((m, p) for m, p, _ in calls) == [("GET", "/v1/models")] * 2 + [("POST", "/v1/messages")] * 2
    for method, _, body in calls:
        if method == "POST":
            assert body["max_tokens"] == 1 and body["model"] == "claude-3-haiku-20240307"
            assert len(body["messages"]) == 1 and len(body["messages"][0]["content"]) <= 2


async def test_a_check_never_logs_a_key(session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    keys = {secret(kind): KeyBehaviour(kind) for kind in KINDS}
    with caplog.at_level(logging.DEBUG), FakeOpenAI(keys) as fake:
        service = openai_service(fake.base_url, list(keys))
        await checker_for({"openai": service}, session).check_all()
    assert "revoked" in caplog.text
    for key in keys:
        assert key not in caplog.text


# How fast, how gently ------------------------------------------------------------------------
async def test_two_hundred_keys_are_checked_in_a_few_seconds(session: aiohttp.ClientSession) -> None:
    keys = {secret(KINDS[i % len(KINDS)], i): KeyBehaviour(KINDS[i % len(KINDS)]) for i in range(200)}
    with FakeOpenAI(keys) as fake:
        service = openai_service(fake.base_url, list(keys))
        started = time.perf_counter()
        await checker_for({"openai": service}, session).check_all()
        took = time.perf_counter() - started
    snap = service.pool.snapshot()
    assert snap["total"] == 200 and snap["revoked"] == 25 and snap["over_quota"] == 25 and snap["trial"] == 25
    assert took < 5, f"checking 200 keys took {took:.1f}s"


async def test_no_more_than_key_check_concurrency_checks_run_at_once(session: aiohttp.ClientSession) -> None:
    keys = {secret("paid", i): KeyBehaviour("paid") for i in range(24)}
    with CountingOpenAI(keys, delay=0.05) as fake:
        service = openai_service(fake.base_url, list(keys))
        await checker_for({"openai": service}, session, env={"KEY_CHECK_CONCURRENCY": "4"}).check_all()
    assert fake.max_in_flight == 4
    assert service.pool.snapshot()["active"] == 24


async def test_a_recheck_while_a_check_runs_joins_it_instead_of_checking_twice(session: aiohttp.ClientSession) -> None:
    keys = {secret("paid", i): KeyBehaviour("paid") for i in range(10)}
    with CountingOpenAI(keys, delay=0.05) as fake:
        service = openai_service(fake.base_url, list(keys))
        checker = checker_for({"openai": service}, session)
        await asyncio.gather(checker.recheck(), checker.recheck(), checker.check_all(), checker.recheck())
        listings = [r.key for r in fake.requests if r.path == "/v1/models"]
    assert sorted(listings) == sorted(keys)


async def test_the_first_check_sets_checking_until_every_key_was_checked(session: aiohttp.ClientSession) -> None:
    keys = {secret("paid", i): KeyBehaviour("paid") for i in range(5)}
    with CountingOpenAI(keys, delay=0.2) as fake:
        service = openai_service(fake.base_url, list(keys))
        checker = checker_for({"openai": service}, session)
        await checker.start()
        assert service.pool.snapshot()["checking"] is True
        assert service.pool.models() is None  # the model list waits for the first check
        await until(lambda: not service.pool.checking)
        assert all(k.last_checked for k in service.pool.keys)
        assert service.pool.models() == set(FakeOpenAI.DEFAULT_MODELS)
        await checker.stop()


async def test_stop_ends_checks_in_flight_at_once(session: aiohttp.ClientSession) -> None:
    with CountingOpenAI({"sk-k-0123456789": KeyBehaviour("paid")}, delay=10) as fake:
        service = openai_service(fake.base_url, ["sk-k-0123456789"])
        checker = checker_for({"openai": service}, session)
        await checker.start()
        await until(lambda: fake.in_flight == 1)
        started = time.monotonic()
        await checker.stop()
        assert time.monotonic() - started < 1
    assert service.pool.checking is False and service.pool.keys[0].state is KeyState.UNCHECKED


# When it checks again ------------------------------------------------------------------------
async def test_keys_are_checked_again_every_interval_with_jitter(session: aiohttp.ClientSession) -> None:
    keys = {secret("paid"): KeyBehaviour("paid"), secret("revoked"): KeyBehaviour("revoked")}
    timeline = Timeline()
    with FakeOpenAI(keys) as fake:
        service = openai_service(fake.base_url, list(keys))
        checker = checker_for(
            {"openai": service}, session, clock=timeline.clock, sleep=timeline.sleep, rand=lambda: 0.0
        )
        await checker.start()
        await until(lambda: len(timeline.sleeps) == 1)
        assert timeline.sleeps[0] == pytest.approx(0.9 * 3600)  # the interval, minus 10% jitter
        fake.reset()
        timeline.release()
        await until(lambda: len(timeline.sleeps) == 2)
        assert [r.key for r in fake.requests if r.path == "/v1/models"] == [secret("paid")]  # revoked: no more
        await checker.stop()


async def test_a_network_error_retries_the_key_sooner_and_does_not_mark_it_dead(
    session: aiohttp.ClientSession,
) -> None:
    keys = {secret("paid"): KeyBehaviour("paid"), secret("paid", 1): KeyBehaviour("paid")}
    timeline = Timeline()
    with closed_port_url() as unreachable, FakeOpenAI(keys) as fake:
        service = openai_service(unreachable, list(keys))
        service.pool.restore({service.pool.keys[1].id: {"state": "active", "tier": "paid"}})
        checker = checker_for({"openai": service}, session, clock=timeline.clock, sleep=timeline.sleep)
        await checker.start()
        await until(lambda: len(timeline.sleeps) == 1)
        assert [k.state for k in service.pool.keys] == [KeyState.UNCHECKED, KeyState.ACTIVE]
        assert service.pool.checking is False  # the first check ended, even if it failed
        assert timeline.sleeps[0] == 30  # retried in 30s, not in an hour
        service.base_url = fake.base_url  # the network is back
        timeline.release()
        await until(lambda: len(timeline.sleeps) == 2)
        assert [k.state for k in service.pool.keys] == [KeyState.ACTIVE, KeyState.ACTIVE]
        assert timeline.sleeps[1] == pytest.approx(3600, rel=0.11)
        await checker.stop()


async def test_a_check_that_times_out_is_retried_not_held_against_the_key(session: aiohttp.ClientSession) -> None:
    with CountingOpenAI({"sk-k-0123456789": KeyBehaviour("paid")}, delay=2) as fake:
        service = openai_service(fake.base_url, ["sk-k-0123456789"])
        checker = checker_for({"openai": service}, session, timeout=0.2)
        await checker.check_all()
    key = service.pool.keys[0]
    assert key.state is KeyState.UNCHECKED and key.usable
    assert checker.next_check("openai", key.id) - time.time() == pytest.approx(30, abs=2)


async def test_a_recheck_includes_revoked_keys_so_a_restored_key_can_come_back(
    session: aiohttp.ClientSession,
) -> None:
    with FakeOpenAI({"sk-k-0123456789": KeyBehaviour("revoked")}) as fake:
        service = openai_service(fake.base_url, ["sk-k-0123456789"])
        checker = checker_for({"openai": service}, session)
        await checker.check_all()
        assert service.pool.keys[0].state is KeyState.REVOKED
        fake.reset()
        await checker.check_all()
        assert fake.requests == []  # a revoked key is not checked on schedule
        fake.keys["sk-k-0123456789"] = KeyBehaviour("paid")
        await checker.recheck()
    assert service.pool.keys[0].state is KeyState.ACTIVE


async def test_only_checks_that_change_something_ask_to_save(session: aiohttp.ClientSession) -> None:
    keys = {secret("paid"): KeyBehaviour("paid"), secret("revoked"): KeyBehaviour("revoked")}
    saved: list[str] = []
    with FakeOpenAI(keys) as fake:
        service = openai_service(fake.base_url, list(keys))
        service.pool.on_change = lambda key: saved.append(key.id)
        checker = checker_for({"openai": service}, session)
        await checker.check_all()
        assert sorted(saved) == sorted(k.id for k in service.pool.keys)
        saved.clear()
        await checker.recheck()
        assert saved == []
        fake.keys[secret("paid")] = KeyBehaviour("over_quota")
        await checker.recheck()
    assert saved == [service.pool.keys[0].id]
