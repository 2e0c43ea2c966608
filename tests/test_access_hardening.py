"""Access-control hardening: guessing the proxy key or a user token is locked out per IP, a
client's request cannot take the Claude pool down, and client-chosen model names cannot grow a
key's saved state without bound."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx
import pytest
from aiohttp import web

from proxy.access.gatekeeper import Gatekeeper
from proxy.access.ratelimit import FailureGuard
from proxy.errors import Kind
from proxy.keys.checker import KeyChecker
from proxy.keys.pool import MAX_LOST_MODELS, CheckResult, KeyPool, KeyState, Outcome, Verdict
from proxy.pipeline import Service
from proxy.providers.anthropic.dialect import Anthropic
from tests.conftest import PROXY_KEY, make_settings
from tests.fakes import FakeAnthropic, KeyBehaviour, anthropic_error
from tests.test_access import ADMIN_KEY, Clock, refused

RIGHT = "pk-a-human-chosen-password"
PAID = "sk-ant-paid-0123456789"
OTHER = "sk-ant-other-9999999999"
HAIKU = "claude-3-5-haiku-20241022"
MESSAGE = {"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": "say hi please"}]}


@pytest.fixture
def clock() -> Clock:
    return Clock()


def proxy_key_gate(tmp_path: Path, clock: Clock) -> Gatekeeper:
    return Gatekeeper(make_settings({"PROXY_KEY": RIGHT}, tmp_path), clock=clock)


def guess(gk: Gatekeeper, ip: str, times: int, credential: str = "pk-wrong-guess") -> None:
    for n in range(times):
        assert refused(gk.identify, f"{credential}-{n}", ip).status == 401


# 1. Guessing the proxy key or a user token --------------------------------------------------------


def test_twenty_wrong_proxy_keys_lock_out_wrong_keys_while_the_right_key_still_works(
    tmp_path: Path, clock: Clock
) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    guess(gk, "198.51.100.7", 20)

    error = refused(gk.identify, "pk-another-guess", "198.51.100.7")
    assert error.status == 429 and error.kind is Kind.RATE_LIMIT
    assert 1 <= int(error.headers["Retry-After"]) <= 300
    # Everyone else behind the same address (a NAT, a front proxy) who knows the key goes on.
    assert gk.identify(RIGHT, "198.51.100.7").label == "proxy-key"
    assert gk.identify(RIGHT, "198.51.100.8").label == "proxy-key"


def test_nineteen_wrong_keys_are_not_yet_a_lockout(tmp_path: Path, clock: Clock) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    guess(gk, "198.51.100.7", 19)
    assert gk.identify(RIGHT, "198.51.100.7").label == "proxy-key"


def test_the_lockout_ends_after_its_time(tmp_path: Path, clock: Clock) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    guess(gk, "198.51.100.7", 20)
    wait = int(refused(gk.identify, "pk-guess", "198.51.100.7").headers["Retry-After"])
    clock.advance(wait - 1)
    assert refused(gk.identify, "pk-guess", "198.51.100.7").status == 429
    clock.advance(300.5)  # each wrong guess while locked out extends the lockout
    assert refused(gk.identify, "pk-guess", "198.51.100.7").status == 401


def test_a_success_does_not_wipe_the_failures_counted_so_far(tmp_path: Path, clock: Clock) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    for _ in range(9):  # someone who knows one credential cannot launder guesses with it
        guess(gk, "198.51.100.7", 2)
        assert gk.identify(RIGHT, "198.51.100.7").label == "proxy-key"
    guess(gk, "198.51.100.7", 2)
    assert refused(gk.identify, "pk-guess", "198.51.100.7").status == 429


def test_failures_older_than_the_window_are_forgotten(tmp_path: Path, clock: Clock) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    guess(gk, "198.51.100.7", 19)
    clock.advance(301)
    guess(gk, "198.51.100.7", 19)
    assert gk.identify(RIGHT, "198.51.100.7").label == "proxy-key"


def test_a_missing_credential_is_not_a_guess(tmp_path: Path, clock: Clock) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    for _ in range(50):  # a browser opening the URL, a client not yet configured
        assert refused(gk.identify, None, "198.51.100.7").status == 401
    assert gk.identify(RIGHT, "198.51.100.7").label == "proxy-key"


def test_ipv6_clients_are_counted_by_their_slash_64(tmp_path: Path, clock: Clock) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    for n in range(20):  # one host owns a whole /64: a new address per guess changes nothing
        assert refused(gk.identify, "pk-wrong", f"2001:db8:1:2::{n + 1:x}").status == 401
    assert refused(gk.identify, "pk-wrong", "2001:db8:1:2:ffff::1").status == 429
    assert refused(gk.identify, "pk-wrong", "2001:db8:1:3::1").status == 401
    assert gk.identify(RIGHT, "2001:db8:1:2:ffff::1").label == "proxy-key"


def test_user_token_guesses_are_locked_out_and_known_users_cannot_reset_them(tmp_path: Path, clock: Clock) -> None:
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, tmp_path)
    from proxy.access import build_access

    gk = build_access(settings, clock).gatekeeper
    mallory = gk.users.create(nickname="mallory")
    alice = gk.users.create(nickname="alice")
    for _ in range(9):
        guess(gk, "198.51.100.7", 2, credential="not-a-token")
        assert gk.identify(mallory.token, "198.51.100.7").label == "mallory"
    guess(gk, "198.51.100.7", 2, credential="not-a-token")
    assert refused(gk.identify, "not-a-token", "198.51.100.7").status == 429
    assert gk.identify(alice.token, "198.51.100.7").label == "alice"  # valid tokens still work
    assert gk.identify(alice.token, "198.51.100.9").label == "alice"


def test_other_token_lookups_share_the_guessing_lockout(tmp_path: Path, clock: Clock) -> None:
    """`user_for` is for routes other than the proxy path (such as /proxy/me): same lockout."""
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, tmp_path)
    from proxy.access import build_access

    gk = build_access(settings, clock).gatekeeper
    dave = gk.users.create(nickname="dave")
    assert gk.user_for(dave.token, "198.51.100.7") is dave
    assert gk.user_for(None, "198.51.100.7") is None
    for n in range(20):
        assert refused(gk.user_for, f"not-a-token-{n}", "198.51.100.7").status == 401
    error = refused(gk.user_for, "not-a-token", "198.51.100.7")
    assert error.status == 429 and "Retry-After" in error.headers
    assert refused(gk.identify, "not-a-token", "198.51.100.7").status == 429  # one count for both doors
    assert gk.user_for(dave.token, "198.51.100.7") is dave  # dave's own page still answers him
    assert gk.identify(dave.token, "198.51.100.7").label == "dave"


def test_a_refused_user_token_is_not_a_guess(tmp_path: Path, clock: Clock) -> None:
    settings = make_settings({"GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN_KEY}, tmp_path)
    from proxy.access import build_access

    gk = build_access(settings, clock).gatekeeper
    bob = gk.users.create(nickname="bob")
    gk.users.disable(bob, "testing")
    for _ in range(30):  # a disabled user's client retrying knows its token: it is not guessing
        assert refused(gk.identify, bob.token, "198.51.100.7").status == 403
    carol = gk.users.create(nickname="carol")
    assert gk.identify(carol.token, "198.51.100.7").label == "carol"


def test_without_a_gate_nothing_is_locked_out(tmp_path: Path, clock: Clock) -> None:
    gk = Gatekeeper(make_settings({}, tmp_path), clock=clock)
    for n in range(50):
        assert gk.identify(f"anything-{n}", "198.51.100.7").label == "anon"


def test_guesses_and_lockouts_never_log_or_echo_the_credential(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    gk = proxy_key_gate(tmp_path, clock)
    with caplog.at_level(logging.DEBUG):
        messages = [refused(gk.identify, f"pk-secret-guess-{n}", "198.51.100.7").message for n in range(25)]
        assert gk.identify(RIGHT, "198.51.100.7").label == "proxy-key"
    assert "pk-secret-guess" not in caplog.text + "".join(messages)
    assert RIGHT not in caplog.text + "".join(messages)
    assert "198.51.100.7" in caplog.text  # the lockout is logged, by IP


def test_the_guard_stays_fast_with_thousands_of_locked_out_clients(clock: Clock) -> None:
    guard = FailureGuard(limit=20, window_s=300, lockout_s=300, clock=clock)
    started = time.perf_counter()
    for n in range(5000):
        client = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
        for _ in range(20):
            guard.failed(client)
        assert guard.retry_after(client) is not None
    assert time.perf_counter() - started < 2.0


def test_a_failure_counter_holds_no_more_than_its_limit(clock: Clock) -> None:
    guard = FailureGuard(limit=20, window_s=300, lockout_s=300, clock=clock)
    for _ in range(10_000):  # a caller that keeps failing without honouring the lockout
        guard.failed("10.0.0.1")
    assert max(len(hits) for hits in guard._failures._hits.values()) <= 20


def test_a_locked_out_ip_gets_429_with_retry_after_over_http(claude_pool) -> None:
    served, fake = claude_pool({PAID: KeyBehaviour()}, TRUSTED_PROXIES="1")  # X-Forwarded-For believed
    url = f"{served.proxy('anthropic')}/messages"

    def post(key: str, ip: str) -> httpx.Response:
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "x-forwarded-for": ip}
        return httpx.post(url, json=MESSAGE, headers=headers, timeout=10)

    assert {post(f"pk-guess-{n}", "203.0.113.5").status_code for n in range(20)} == {401}
    started = time.monotonic()
    locked = post("pk-guess-again", "203.0.113.5")
    assert time.monotonic() - started >= 0.9  # a locked-out guesser waits for each answer
    assert locked.status_code == 429
    assert 1 <= int(locked.headers["retry-after"]) <= 300
    assert locked.json()["error"]["type"] == "rate_limit_error"
    assert post(PROXY_KEY, "203.0.113.5").status_code == 200  # the others at that address go on
    assert post(PROXY_KEY, "203.0.113.6").status_code == 200
    assert fake.calls_by_key == {PAID: 2}


# 2. A client's request cannot revoke the Claude pool ---------------------------------------------

CLAUDE = Anthropic()


def classify(status: int, type_: str, message: str) -> Verdict:
    return CLAUDE.classify(status, {}, anthropic_error(type_, message)).verdict


def test_a_403_at_request_time_sets_the_key_aside_instead_of_revoking_it() -> None:
    message = "Your API key does not have permission to use the specified resource."
    assert classify(403, "permission_error", message) is Verdict.RETRYABLE


@pytest.mark.parametrize(
    "message",
    [
        "This organization has been disabled.",
        "Your organization has been disabled.",
        "This API key has been disabled.",
        "Your account has been deactivated.",
    ],
)
def test_a_403_saying_the_key_or_organization_is_disabled_still_revokes(message: str) -> None:
    assert classify(403, "permission_error", message) is Verdict.REVOKED


def test_a_401_always_revokes() -> None:
    assert classify(401, "authentication_error", "invalid x-api-key") is Verdict.REVOKED


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (
            "Unexpected value(s) `organization has been disabled` for the `anthropic-beta` header. "
            "Please consult our documentation at docs.anthropic.com or try again without the header.",
            "a beta header value, echoed",
        ),
        ("This organization has been disabled: Extra inputs are not permitted", "a body field name, echoed"),
        (
            "Your credit balance is too low to access the Anthropic API.: Extra inputs are not permitted",
            "a body field name, echoed",
        ),
        (
            "messages.0.content.0: Input tag 'You have reached your specified API usage limits' found using "
            "'type' does not match any of the expected tags",
            "a content type, echoed",
        ),
    ],
)
def test_client_text_echoed_in_a_400_neither_revokes_nor_exhausts_the_key(message: str, why: str) -> None:
    assert classify(400, "invalid_request_error", message) is Verdict.CLIENT_ERROR, why


class BetaRefusingAnthropic(FakeAnthropic):
    """An org without access to a beta: a request naming it gets 403 permission_error, whatever the key."""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/messages" and "anthropic-beta" in request.headers:
            message = "Your API key does not have permission to use the specified resource."
            return self._json(anthropic_error("permission_error", message), 403)
        return await super()._dispatch(request)


def test_a_client_provoked_403_leaves_the_pool_usable(claude_pool) -> None:
    served, fake = claude_pool({PAID: KeyBehaviour(), OTHER: KeyBehaviour()}, fake_class=BetaRefusingAnthropic)
    client = anthropic.Anthropic(base_url=f"{served.url}/proxy/anthropic", api_key=PROXY_KEY, max_retries=0, timeout=10)

    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.create(**MESSAGE, extra_headers={"anthropic-beta": "some-beta-2099-01-01"})

    keys = httpx.get(f"{served.url}/status", timeout=5).json()["keys"]["anthropic"]
    assert keys["revoked"] == 0
    assert client.messages.create(**MESSAGE).content[0].text == "Hello from fake claude"


class ForbiddingAnthropic(FakeAnthropic):
    """Answers 403 to everything `forbidden` keys send, as Anthropic does for a disabled key."""

    forbidden: set[str] = set()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-api-key") in self.forbidden:
            message = "Your API key does not have permission to use the specified resource."
            return self._json(anthropic_error("permission_error", message), 403)
        return await super()._dispatch(request)


class ProbeForbiddingAnthropic(FakeAnthropic):
    """Lists models for every key, then answers 403 to the `forbidden` keys' probe."""

    forbidden: set[str] = set()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/messages" and request.headers.get("x-api-key") in self.forbidden:
            message = "Your API key does not have permission to use the specified resource."
            return self._json(anthropic_error("permission_error", message), 403)
        return await super()._dispatch(request)


@pytest.mark.parametrize("fake_class", [ForbiddingAnthropic, ProbeForbiddingAnthropic], ids=["listing", "probe"])
async def test_the_checker_still_revokes_a_key_its_own_check_gets_403_for(fake_class: Any) -> None:
    from proxy.config import load_settings

    keys = {PAID: KeyBehaviour(), OTHER: KeyBehaviour()}
    with fake_class(keys) as fake:
        fake.forbidden = {OTHER}
        service = Service(Anthropic(), fake.base_url, KeyPool("anthropic", list(keys), "ant-"), "ANTHROPIC_KEY")
        async with aiohttp.ClientSession() as session:
            settings = load_settings({"KEY_CHECK_INTERVAL": "3600"}, env_file=None)
            await KeyChecker({"anthropic": service}, lambda: session, settings).check_all()
    states = {k.secret: k.state for k in service.pool.keys}
    assert states == {PAID: KeyState.ACTIVE, OTHER: KeyState.REVOKED}


# 3. Client-chosen model names cannot grow a key's saved state -------------------------------------


def test_a_listed_key_does_not_record_models_it_never_listed() -> None:
    pool = KeyPool("anthropic", [PAID], "ant-")
    key = pool.keys[0]
    pool.checked(key, CheckResult(Verdict.OK, models=frozenset({HAIKU})))
    saved: list[str] = []
    pool.on_change = lambda k: saved.append(k.id)

    pool.apply(key, Outcome(Verdict.MODEL_MISSING), "claude-made-up-by-a-client")
    assert key.lost_models == frozenset() and saved == []

    pool.apply(key, Outcome(Verdict.MODEL_MISSING), HAIKU)  # listed, yet refused: worth remembering
    assert key.lost_models == {HAIKU} and saved == [key.id]


def test_an_unlisted_key_remembers_a_bounded_number_of_lost_models() -> None:
    pool = KeyPool("anthropic", [PAID], "ant-")
    key = pool.keys[0]
    saved: list[str] = []
    pool.on_change = lambda k: saved.append(k.id)
    for n in range(MAX_LOST_MODELS + 500):
        pool.apply(key, Outcome(Verdict.MODEL_MISSING), f"claude-junk-{n}")
    assert len(key.lost_models) == MAX_LOST_MODELS
    assert len(saved) <= MAX_LOST_MODELS


def test_a_check_forgets_lost_models_the_key_does_not_list() -> None:
    pool = KeyPool("anthropic", [PAID], "ant-")
    key = pool.keys[0]
    for model in ["claude-junk-1", "claude-junk-2", HAIKU]:
        pool.apply(key, Outcome(Verdict.MODEL_MISSING), model)
    pool.checked(key, CheckResult(Verdict.OK, models=frozenset({HAIKU, "claude-3-haiku-20240307"})))
    assert key.lost_models == {HAIKU}
    assert not key.serves(HAIKU) and key.serves("claude-3-haiku-20240307")


def test_a_restored_state_keeps_lost_models_bounded() -> None:
    pool = KeyPool("anthropic", [PAID, OTHER], "ant-")
    junk = [f"claude-junk-{n}" for n in range(5000)]
    pool.restore(
        {
            pool.keys[0].id: {"state": "active", "models": None, "lost_models": junk},
            pool.keys[1].id: {"state": "active", "models": [HAIKU], "lost_models": [*junk, HAIKU]},
        }
    )
    assert len(pool.keys[0].lost_models) == MAX_LOST_MODELS
    assert pool.keys[1].lost_models == {HAIKU}


def test_a_valid_token_reads_its_own_page_and_uses_the_proxy_from_a_locked_out_address(
    proxy_app, fake_openai
) -> None:
    served = proxy_app(OPENAI_KEY="sk-paid-0123456789abcdef", OPENAI_BASE_URL=fake_openai.base_url,
                       GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY)  # fmt: skip
    token = served.runtime.access.users.create(nickname="nat-neighbour").token
    me = f"{served.url}/proxy/me"
    for n in range(20):  # someone else behind the same address guesses tokens
        assert httpx.get(me, headers={"authorization": f"Bearer guess-{n}-0123456789"}).status_code == 401
    assert httpx.get(me, headers={"authorization": "Bearer guess-0123456789"}, timeout=10).status_code == 429
    mine = httpx.get(me, headers={"authorization": f"Bearer {token}"})
    assert mine.status_code == 200 and mine.json()["nickname"] == "nat-neighbour"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    chat = httpx.post(f"{served.proxy()}/chat/completions", json=body, headers={"authorization": f"Bearer {token}"})
    assert chat.status_code == 200
    wrong = httpx.post(f"{served.proxy()}/chat/completions", json=body, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 429 and wrong.json()["error"]["type"] == "rate_limit_error"
    admin = httpx.get(f"{served.url}/admin/api/users", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200
