"""The proof of work in a real browser: headless Chromium opens the whole app, solves the
argon2id challenge on the "Get a token" tab with the vendored hash-wasm, and the issued token
chats through the proxy."""

from __future__ import annotations

import time

import openai
import pytest

from tests.browser_util import MISSING_CHROMIUM, chromium_path, field, launch_chromium, open_tab, serve_whole_app
from tests.conftest import PAID, make_settings
from tests.fakes import FakeOpenAI
from tests.test_pow import POW_ENV

CHROMIUM = chromium_path()
if CHROMIUM is None:
    pytest.skip(MISSING_CHROMIUM, allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402 - only with Chromium


def test_the_page_solves_a_challenge_and_the_issued_token_chats(tmp_path, fake_openai: FakeOpenAI) -> None:
    env = {**POW_ENV, "OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "ARGON2_MEMORY_KB": "1024"}
    settings = make_settings(env, tmp_path)
    with serve_whole_app(settings) as served, sync_playwright() as playwright:
        browser = launch_chromium(playwright, CHROMIUM)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(served.url + "/", wait_until="domcontentloaded")
            open_tab(page, "Get a token")
            started = time.perf_counter()
            page.locator("#pow-start").click()
            expect(page.locator("#pow-status")).to_contain_text("Your token is ready", timeout=60_000)
            solved_in = time.perf_counter() - started
            token = field(page, "pow-token").input_value()
            assert token and not errors, errors
        finally:
            browser.close()
    print(f"browser solve (4 hashes expected, argon2id t=2 m=1 MiB): {solved_in:.2f} s")
    with serve_whole_app(settings) as again:  # the token was saved: it works after a restart too
        client = openai.OpenAI(base_url=again.proxy(), api_key=token, max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    assert any(r.key == PAID for r in fake_openai.requests)
