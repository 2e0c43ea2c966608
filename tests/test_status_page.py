"""What /status tells: per-family key counts, estimated costs from an overridable price table,
the owner's greeting, and SERVICE_INFO_PASSWORD hiding status and usage from strangers."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from proxy.config import ConfigError
from proxy.prices import DEFAULT_PRICES, cost, parse_prices
from tests.conftest import PAID, PROXY_KEY, Served, make_settings
from tests.fakes import FakeOpenAI

INFO = "info-password-for-tests-31"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}


def chat(served: Served) -> None:
    reply = httpx.post(
        served.proxy() + "/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=20
    )
    assert reply.status_code == 200, reply.text


def test_a_service_info_password_hides_status_and_usage_from_strangers(
    fake_openai: FakeOpenAI, proxy_app: Callable[..., Served]
) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY, SERVICE_INFO_PASSWORD=INFO
    )
    chat(served)
    stranger = httpx.get(served.url + "/status", timeout=10).json()
    assert stranger["locked"] is True and "keys" not in stranger and "usage" not in stranger
    assert stranger["endpoints"]["openai"].endswith("/proxy/openai/v1")  # how to connect stays public
    wrong = httpx.get(served.url + "/status", headers={"Authorization": "Bearer nope"}, timeout=10).json()
    assert "usage" not in wrong
    for headers in ({"Authorization": f"Bearer {INFO}"}, {"x-service-info-password": INFO}):
        owner = httpx.get(served.url + "/status", headers=headers, timeout=10).json()
        assert owner["usage"]["requests"] == 1 and "openai" in owner["keys"]
    assert INFO not in httpx.get(served.url + "/status", timeout=10).text


def test_guessing_the_service_info_password_locks_out_wrong_guesses_but_not_the_right_password(
    fake_openai: FakeOpenAI, proxy_app: Callable[..., Served]
) -> None:
    """Issue 9 item 7: behind a NAT or a front proxy many visitors share one address; one of them
    guessing must not lock the others out of the status they hold the password for."""
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, SERVICE_INFO_PASSWORD=INFO)
    for attempt in range(10):
        httpx.get(served.url + "/status", headers={"Authorization": f"Bearer guess-{attempt}"}, timeout=10)
    assert served.runtime.info_guard.retry_after("127.0.0.1") is not None  # the address is locked out
    right = httpx.get(served.url + "/status", headers={"Authorization": f"Bearer {INFO}"}, timeout=10).json()
    assert "usage" in right and "keys" in right  # the right password still opens the status
    # ...and does not launder the guesses: wrong ones are still refused, and still counted.
    wrong = httpx.get(served.url + "/status", headers={"Authorization": "Bearer guess-11"}, timeout=10).json()
    assert wrong["locked"] is True and "usage" not in wrong
    assert served.runtime.info_guard.retry_after("127.0.0.1") is not None


def test_costs_per_family_show_only_when_asked_and_follow_the_owners_prices(
    fake_openai: FakeOpenAI, proxy_app: Callable[..., Served]
) -> None:
    plain = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY)
    chat(plain)
    assert "cost_usd" not in httpx.get(plain.url + "/status", timeout=10).json()["usage"]

    priced = proxy_app(
        OPENAI_KEY=PAID,
        OPENAI_BASE_URL=fake_openai.base_url,
        PROXY_KEY=PROXY_KEY,
        SHOW_TOKEN_COSTS="true",
        TOKEN_PRICES="gpt-4o-mini=1000000/2000000",  # a dollar a token in, two out: easy to check
    )
    chat(priced)
    usage = httpx.get(priced.url + "/status", timeout=10).json()["usage"]
    family = usage["by_family"]["gpt-4o-mini"]
    assert family["cost_usd"] == family["tokens_in"] * 1 + family["tokens_out"] * 2 > 0
    assert usage["cost_usd"] == family["cost_usd"]


def test_the_price_table_reads_pairs_and_single_prices_and_rejects_nonsense(tmp_path) -> None:
    assert parse_prices("gpt-4o=2.5/10, claude-sonnet = 3") == {"gpt-4o": (2.5, 10.0), "claude-sonnet": (3.0, 3.0)}
    assert cost(DEFAULT_PRICES, "gpt-4o", 1_000_000, 1_000_000) == 12.5
    assert cost(DEFAULT_PRICES, "unknown-family", 10, 10) is None
    with pytest.raises(ConfigError, match="TOKEN_PRICES"):
        make_settings({"TOKEN_PRICES": "gpt-4o=cheap"}, tmp_path)


def test_the_greeting_and_per_family_key_counts_are_in_the_status(
    fake_openai: FakeOpenAI, proxy_app: Callable[..., Served]
) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, CHECK_KEYS="true", GREETING="**Hi** friends"
    )
    assert fake_openai.wait_for(lambda: served.runtime.status()["keys"]["openai"]["unchecked"] == 0, timeout=15)
    status = httpx.get(served.url + "/status", timeout=10).json()
    assert status["greeting"] == "**Hi** friends"
    assert status["keys"]["openai"]["by_family"]["gpt-4o"] == {"active": 1, "limited": 0, "revoked": 0}
