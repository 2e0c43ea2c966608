"""Abuse controls through the real app: IP blacklist and admin whitelist (edited at run time and
persisted), blocked origins, rejected phrases (with a time budget) and image inputs."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from proxy.access import abuse
from proxy.access.abuse import PhraseFilter
from proxy.access.cidr import CidrSet
from proxy.server import CLIENT_IP_HEADER, INTERNAL_HEADER
from tests.browser_util import serve_whole_app
from tests.conftest import PAID, PROXY_KEY, Served, make_settings
from tests.fakes import FakeOpenAI

ADMIN = "admin-key-for-abuse-tests-01"
HELLO = [{"role": "user", "content": "Hello there friend"}]
IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
]


def chat(served: Served, messages=HELLO, key: str = PROXY_KEY, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{served.proxy()}/chat/completions",
        json={"model": "gpt-4o", "messages": messages},
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=10,
    )


def as_visitor(served: Served, ip: str) -> dict[str, str]:
    """Headers that make a loopback call count as coming from `ip` (as the page's own calls do)."""
    return {CLIENT_IP_HEADER: ip, INTERNAL_HEADER: served.runtime.internal_secret}


def admin(served: Served, **headers: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}", **headers}, timeout=10
    )


# ---------------------------------------------------------------- CIDR sets (pure)


def test_cidr_set_matches_addresses_and_ranges_of_both_families() -> None:
    cidrs = CidrSet(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])
    assert "10.200.1.1" in cidrs and "192.0.2.7" in cidrs and "2001:db8:ffff::1" in cidrs
    assert "192.0.2.8" not in cidrs and "11.0.0.1" not in cidrs and "2001:db9::1" not in cidrs
    assert "::ffff:10.1.2.3" in cidrs  # an IPv4-mapped IPv6 address is its IPv4 address
    assert "unknown" not in cidrs and "" not in cidrs


def test_a_large_blacklist_costs_no_more_per_lookup_than_a_small_one() -> None:
    small = CidrSet(["10.0.0.0/8"])
    large = CidrSet([f"{a}.{b}.{c}.0/24" for a in (11, 12) for b in range(100) for c in range(100)])
    assert len(large) == 20_000

    def per_lookup(cidrs: CidrSet) -> float:
        started = time.perf_counter()
        for _ in range(20_000):
            _ = "198.51.100.1" in cidrs
        return (time.perf_counter() - started) / 20_000

    assert "12.99.99.1" in large
    assert per_lookup(large) < 5 * per_lookup(small) + 20e-6


# ---------------------------------------------------------------- IP blacklist, admin whitelist


def test_a_blacklisted_address_is_refused_by_the_proxy_the_page_and_the_admin_api(
    tmp_path, fake_openai: FakeOpenAI
) -> None:
    settings = make_settings(
        {
            "OPENAI_KEY": PAID,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "PROXY_KEY": PROXY_KEY,
            "ADMIN_KEY": ADMIN,
            "IP_BLACKLIST": "127.0.0.0/8",
        },
        tmp_path,
    )
    with serve_whole_app(settings) as served:
        proxied = chat(served)
        assert proxied.status_code == 403
        assert proxied.json()["error"]["message"] == "This address is blocked from this proxy."
        claude = httpx.post(f"{served.url}/proxy/anthropic/v1/messages", json={}, timeout=10)
        assert claude.status_code == 403 and claude.json()["type"] == "error"  # Anthropic's shape
        assert httpx.get(f"{served.url}/", timeout=10).status_code == 403
        assert httpx.get(f"{served.url}/config", timeout=10).status_code == 403
        assert admin(served).get("/users").status_code == 403
    assert fake_openai.requests == []


def test_ip_rules_are_edited_at_run_time_persisted_and_cannot_lock_the_admin_out(
    proxy_app, fake_openai: FakeOpenAI
) -> None:
    env = {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY, "ADMIN_KEY": ADMIN}
    served = proxy_app(**env)
    assert admin(served).get("/ip-rules").json() == {"ip_blacklist": [], "admin_whitelist": []}
    assert chat(served, **as_visitor(served, "203.0.113.9")).status_code == 200  # off by default

    locked_out = admin(served).put("/ip-rules", json={"admin_whitelist": ["10.0.0.0/8"]})
    assert locked_out.status_code == 400 and "lock you" in locked_out.json()["error"]["message"]
    bad = admin(served).put("/ip-rules", json={"ip_blacklist": ["300.1.2.3"]})
    assert bad.status_code == 400 and "300.1.2.3" in bad.json()["error"]["message"]

    saved = admin(served).put(
        "/ip-rules", json={"ip_blacklist": "203.0.113.0/24", "admin_whitelist": ["127.0.0.1", "::1"]}
    )
    assert saved.status_code == 200, saved.text
    fake_openai.reset()
    refused = chat(served, **as_visitor(served, "203.0.113.9"))
    assert refused.status_code == 403 and "blocked" in refused.json()["error"]["message"]
    assert chat(served, **as_visitor(served, "198.51.100.1")).status_code == 200
    outsider = admin(served, **as_visitor(served, "198.51.100.1")).get("/users")
    assert outsider.status_code == 403 and "ADMIN_WHITELIST" in outsider.json()["error"]["message"]
    assert len(fake_openai.requests) == 1
    controls = admin(served).get("/controls").json()
    assert controls["refused"] == {"ip_blacklist": 1, "admin_whitelist": 1}  # the owner sees what was refused
    assert controls["ip_blacklist"] == 1 and controls["admin_whitelist"] == 2

    # A restart on the same database keeps the rules edited at run time.
    data_dir = str(served.settings.data_dir)
    served.server.should_exit = True
    time.sleep(0.5)
    again = proxy_app(**env, DATA_DIR=data_dir)
    assert admin(again).get("/ip-rules").json() == {
        "ip_blacklist": ["203.0.113.0/24"],
        "admin_whitelist": ["127.0.0.1/32", "::1/128"],
    }
    assert chat(again, **as_visitor(again, "203.0.113.200")).status_code == 403


def test_admin_whitelist_from_settings_keeps_other_addresses_from_the_admin_api(proxy_app) -> None:
    served = proxy_app(GATEKEEPER="user_token", ADMIN_KEY=ADMIN, ADMIN_WHITELIST="192.0.2.0/24")
    assert admin(served).get("/users").status_code == 403  # 127.0.0.1 is not listed
    assert admin(served, **as_visitor(served, "192.0.2.5")).get("/users").status_code == 200


# ---------------------------------------------------------------- blocked origins


def test_a_browser_page_on_a_blocked_origin_is_refused_with_the_block_message(proxy_app, fake_openai) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID,
        OPENAI_BASE_URL=fake_openai.base_url,
        PROXY_KEY=PROXY_KEY,
        BLOCKED_ORIGINS="badsite.example,other.example",
        BLOCK_MESSAGE="Not from that site, sorry.",
    )
    for header in ({"origin": "https://www.badsite.example"}, {"referer": "https://other.example/chat?x=1"}):
        refused = chat(served, **header)
        assert refused.status_code == 403
        assert refused.json()["error"] == {
            "message": "Not from that site, sorry.",
            "type": "permission_error",
            "param": None,
            "code": "blocked_origin",
        }
    assert fake_openai.requests == []
    assert chat(served, origin="https://good.example").status_code == 200
    assert chat(served).status_code == 200  # no Origin: not a browser page


def test_every_control_is_off_by_default(shared) -> None:
    fake, served = shared
    fake.reset()
    assert chat(served, origin="https://www.badsite.example").status_code == 200
    assert chat(served, messages=IMAGE).status_code == 200
    assert chat(served, messages=[{"role": "user", "content": "forbidden words here"}]).status_code == 200
    assert chat(served, **as_visitor(served, "203.0.113.9")).status_code == 200
    assert len(fake.requests) == 4


# ---------------------------------------------------------------- reject phrases


def test_a_prompt_matching_a_reject_phrase_is_refused_before_any_upstream_call(proxy_app, fake_anthropic) -> None:
    served = proxy_app(
        ANTHROPIC_KEY="sk-ant-paid-0123456789",
        ANTHROPIC_BASE_URL=fake_anthropic.base_url,
        PROXY_KEY=PROXY_KEY,
        REJECT_PHRASES=r"forbidden\s+words,banned",
        REJECT_MESSAGE="Not on this proxy.",
    )
    body = {"model": "claude-3-5-haiku-20241022", "max_tokens": 50}
    headers = {"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01"}
    for content in ("some FORBIDDEN   words", [{"type": "text", "text": "a banned thing"}]):
        refused = httpx.post(
            f"{served.proxy('anthropic')}/messages",
            json={**body, "messages": [{"role": "user", "content": content}]},
            headers=headers,
            timeout=10,
        )
        assert refused.status_code == 400
        assert refused.json() == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "Not on this proxy."},
        }
    in_system = httpx.post(
        f"{served.proxy('anthropic')}/messages",
        json={**body, "system": "be banned", "messages": HELLO},
        headers=headers,
        timeout=10,
    )
    assert in_system.status_code == 400
    assert fake_anthropic.requests == []
    fine = httpx.post(f"{served.proxy('anthropic')}/messages", json={**body, "messages": HELLO}, headers=headers)
    assert fine.status_code == 200


def test_a_pathological_reject_phrase_is_cut_off_by_its_budget_without_stalling_others(
    proxy_app, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 s budget, so that a stalled event loop would show far above the noise of a shared machine.
    monkeypatch.setattr(abuse, "PHRASE_BUDGET_S", 2.0)
    served = proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY, REJECT_PHRASES="(.*a){25}b"
    )
    result: dict[str, httpx.Response] = {}
    slow = threading.Thread(
        target=lambda: result.setdefault("r", chat(served, messages=[{"role": "user", "content": "a" * 5000}]))
    )
    started = time.perf_counter()
    slow.start()
    time.sleep(0.2)
    health_times = []
    with httpx.Client(timeout=5) as client:
        while slow.is_alive() and len(health_times) < 20:
            t0 = time.perf_counter()
            assert client.get(f"{served.url}/health").status_code == 200
            health_times.append(time.perf_counter() - t0)
            time.sleep(0.05)
    slow.join(10)
    elapsed = time.perf_counter() - started
    refused = result["r"]
    assert refused.status_code == 400
    assert "in time" in refused.json()["error"]["message"]
    assert 1.5 < elapsed < 4.5  # answered near the budget (2 s), not when the pattern gives up (up to 3x later)
    assert len(health_times) >= 3 and max(health_times) < 1.0  # the loop kept answering meanwhile
    assert fake_openai.requests == []


def test_the_phrase_budget_bounds_the_time_of_a_pathological_pattern() -> None:
    phrases = PhraseFilter(["(.*a){25}b"], budget_s=0.1)
    started = time.perf_counter()
    assert asyncio.run(phrases.match("a" * 5000)) is None
    assert time.perf_counter() - started < 0.6
    assert asyncio.run(PhraseFilter(["xyz"]).match("a" * 5000)) is False
    phrases.close()


# ---------------------------------------------------------------- image inputs


def test_images_are_refused_unless_the_service_allows_them_and_special_users_are_exempt(
    proxy_app, fake_openai: FakeOpenAI
) -> None:
    env = {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "GATEKEEPER": "user_token", "ADMIN_KEY": ADMIN}
    served = proxy_app(**env, ALLOWED_VISION_SERVICES="anthropic")
    normal = admin(served).post("/users", json={"nickname": "n"}).json()["token"]
    special = admin(served).post("/users", json={"nickname": "s", "type": "special"}).json()["token"]
    client = openai.OpenAI(base_url=served.proxy(), api_key=normal, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=IMAGE)
    assert "images are not allowed" in refused.value.message
    assert fake_openai.requests == []
    assert chat(served, messages=HELLO, key=normal).status_code == 200
    assert chat(served, messages=IMAGE, key=special).status_code == 200

    allowed = proxy_app(**env, ALLOWED_VISION_SERVICES="openai")
    user = admin(allowed).post("/users", json={"nickname": "n"}).json()["token"]
    assert chat(allowed, messages=IMAGE, key=user).status_code == 200


# ---------------------------------------------------------------- Gemini's own request shape


def test_gemini_prompts_and_images_are_checked_and_its_output_clamped(proxy_app) -> None:
    from tests.fakes import KeyBehaviour
    from tests.fakes_gemini import FakeGemini

    key = "AIzaSyGood0123456789abcdefghijklmnopqrs"
    with FakeGemini({key: KeyBehaviour("paid")}) as fake:
        served = proxy_app(
            GOOGLE_AI_KEY=key, GOOGLE_AI_BASE_URL=fake.url, PROXY_KEY=PROXY_KEY, REJECT_PHRASES="forbidden",
            ALLOWED_VISION_SERVICES="openai", MAX_OUTPUT_TOKENS_GOOGLE_AI="32",
        )  # fmt: skip
        url = f"{served.url}/proxy/google-ai/v1beta/models/gemini-2.5-flash:generateContent"
        headers = {"x-goog-api-key": PROXY_KEY}

        def ask(parts: list, **extra) -> httpx.Response:
            body = {"contents": [{"role": "user", "parts": parts}], **extra}
            return httpx.post(url, json=body, headers=headers, timeout=10)

        assert ask([{"text": "a forbidden thing"}]).status_code == 400
        system = {"systemInstruction": {"parts": [{"text": "be forbidden"}]}}
        assert ask([{"text": "hi"}], **system).status_code == 400
        image = {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
        refused = ask([{"text": "what is this"}, image])
        assert refused.status_code == 403 and "images" in refused.text
        assert [r for r in fake.requests if r.method == "POST"] == []

        assert ask([{"text": "hi"}], generationConfig={"maxOutputTokens": 1000}).status_code == 200
        sent = [r for r in fake.requests if r.method == "POST"][-1].json
        assert sent["generationConfig"]["maxOutputTokens"] == 32
