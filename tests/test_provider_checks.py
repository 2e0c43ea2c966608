"""Key checks of the providers in folders (Gemini, OpenAI-compatible services), against fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import aiohttp
import pytest

from proxy.config import load_settings
from proxy.keys.checker import KeyChecker
from proxy.keys.pool import KeyPool
from proxy.pipeline import Service
from proxy.providers.compatible import Compatible
from proxy.providers.compatible import check as compatible_check
from proxy.providers.google import Gemini
from proxy.providers.google import check as google_check
from proxy.providers.registry import KEYLESS
from tests.fakes import FakeOpenAI, KeyBehaviour, _bearer
from tests.fakes_gemini import FakeGemini

GEMINI_KEYS = {
    "AIzaSyPaid00123456789abcdefghijklmnopq": KeyBehaviour("paid"),
    "AIzaSyRevoked123456789abcdefghijklmnop": KeyBehaviour("revoked"),
    "AIzaSyNoBill0123456789abcdefghijklmnop": KeyBehaviour("over_quota"),
    "AIzaSyLimited123456789abcdefghijklmnop": KeyBehaviour("rate_limited", reset_s=30),
}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def check_all(service: Service, session: aiohttp.ClientSession) -> dict[str, dict]:
    checker = KeyChecker({service.dialect.name: service}, lambda: session, load_settings({}, env_file=None))
    await checker.check_all()
    return {key.secret: key.public(0) for key in service.pool.keys}


async def test_gemini_keys_are_told_apart_by_the_check(session: aiohttp.ClientSession) -> None:
    with FakeGemini(GEMINI_KEYS) as fake:
        pool = KeyPool("google-ai", list(GEMINI_KEYS), "gai-")
        service = Service(Gemini(), fake.url, pool, "GOOGLE_AI_KEY", check=google_check.check)
        rows = await check_all(service, session)
        sent = list(fake.requests)
    paid = rows["AIzaSyPaid00123456789abcdefghijklmnopq"]
    assert paid["status"] == "active"
    assert paid["families"] == ["gemini-flash", "gemini-flash-lite", "gemini-pro", "gemma"]  # no embedding model
    assert rows["AIzaSyRevoked123456789abcdefghijklmnop"]["status"] == "revoked"
    assert rows["AIzaSyNoBill0123456789abcdefghijklmnop"]["status"] == "over_quota"
    limited = rows["AIzaSyLimited123456789abcdefghijklmnop"]
    assert limited["status"] == "rate_limited" and limited["tier"] == "trial"  # a FreeTier quota named it
    probes = [r for r in sent if r.method == "POST"]
    assert {r.path for r in probes} == {"/v1beta/models/gemini-2.0-flash-lite:generateContent"}  # the cheapest
    assert all(r.json["generationConfig"] == {"maxOutputTokens": 1} for r in probes)
    assert all("key=" not in r.path for r in sent)  # the key travels in a header only


class FakeDeepSeek(FakeOpenAI):
    DEFAULT_MODELS: ClassVar[list[str]] = ["deepseek-chat", "deepseek-reasoner"]


class FakeLocal(FakeOpenAI):
    DEFAULT_MODELS: ClassVar[list[str]] = ["llama3.1:8b"]

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return _bearer(headers) or "none"


async def test_compatible_keys_are_checked_with_their_model_list(session: aiohttp.ClientSession) -> None:
    keys = {"sk-ds-paid-0123456789": KeyBehaviour("paid"), "sk-ds-gone-0123456789": KeyBehaviour("revoked")}
    with FakeDeepSeek(keys) as fake:
        pool = KeyPool("deepseek", list(keys), "deepseek-")
        service = Service(Compatible("deepseek"), fake.base_url, pool, "DEEPSEEK_KEY", check=compatible_check.check)
        rows = await check_all(service, session)
        assert {r.path for r in fake.requests} == {"/v1/models"}  # free: nothing generated
    assert rows["sk-ds-paid-0123456789"]["status"] == "active"
    assert rows["sk-ds-paid-0123456789"]["families"] == ["deepseek", "deepseek-reasoner"]
    assert rows["sk-ds-gone-0123456789"]["status"] == "revoked"


async def test_a_keyless_local_server_is_checked_too(session: aiohttp.ClientSession) -> None:
    with FakeLocal({"none": KeyBehaviour()}) as fake:
        pool = KeyPool("home", [KEYLESS], "home-")
        service = Service(Compatible("home"), fake.base_url, pool, "HOME_KEY", check=compatible_check.check)
        rows = await check_all(service, session)
        assert "authorization" not in fake.requests[0].headers
    assert rows[KEYLESS]["status"] == "active" and rows[KEYLESS]["families"] == ["home"]


async def test_a_local_server_that_is_down_keeps_its_state(session: aiohttp.ClientSession) -> None:
    pool = KeyPool("home", [KEYLESS], "home-")
    service = Service(Compatible("home"), "http://127.0.0.1:9/v1", pool, "HOME_KEY", check=compatible_check.check)
    rows = await check_all(service, session)
    assert rows[KEYLESS]["status"] == "unchecked"  # nothing known: tried again sooner than the interval
