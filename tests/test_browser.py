"""The page in a real browser: headless Chromium opens the whole app (proxy + Gradio page)
served on loopback in front of a fake OpenAI, and uses it as a visitor would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser_util import (
    MISSING_CHROMIUM,
    WATCH_BOT_JS,
    chromium_path,
    field,
    launch_chromium,
    open_tab,
    pick_model,
    send_chat,
    serve_whole_app,
    table_row,
    type_kept,
    unlock_admin,
)
from tests.conftest import PAID, PROXY_KEY, Served, make_settings
from tests.fakes import FakeOpenAI, KeyBehaviour
from ui.blocks import REFRESH_SECONDS
from ui.usage import event_rows

CHROMIUM = chromium_path()
if CHROMIUM is None:
    pytest.skip(MISSING_CHROMIUM, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402 - only with Chromium

from proxy.keys.pool import key_id  # noqa: E402

SPARE = "sk-spare-fedcba9876543210"
POOL = (PAID, SPARE)
ADMIN_KEY = "admin-key-for-browser-tests-77"
CHUNKS = 8
FULL_REPLY = " ".join(f"tok{i}" for i in range(CHUNKS))
SIGNED_REPLY = FULL_REPLY + "\nanswered by gpt-4o-mini"  # the finished reply names its model
MODEL = "gpt-4o-mini"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SECRETS = (*POOL, PROXY_KEY, ADMIN_KEY)

expect.set_options(timeout=15_000)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    """A fake OpenAI that streams CHUNKS words, 0.1 s apart; one paid key, one trial key."""
    keys = {PAID: KeyBehaviour("paid"), SPARE: KeyBehaviour("trial")}
    with FakeOpenAI(keys, stream_delay=0.1, chunks=CHUNKS) as fake:
        yield fake


def _settings(upstream: FakeOpenAI, tmp: Path, **extra: str) -> Any:
    env = {"OPENAI_KEY": ",".join(POOL), "OPENAI_BASE_URL": upstream.base_url, **extra}
    return make_settings(env, tmp)


@pytest.fixture(scope="module")
def served(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The whole app behind a proxy key, its keys checked at start; an admin key is set too, to
    prove it never shows. Yields once every key is checked, so no check reaches the fake later."""
    settings = _settings(
        upstream, tmp_path_factory.mktemp("proxy"), PROXY_KEY=PROXY_KEY, ADMIN_KEY=ADMIN_KEY, CHECK_KEYS="true"
    )
    with serve_whole_app(settings) as app:
        pool = lambda: app.runtime.status()["keys"]["openai"]  # noqa: E731
        assert upstream.wait_for(lambda: pool()["unchecked"] == 0 and not pool()["checking"], timeout=15), pool()
        yield app


@pytest.fixture(scope="module")
def browser_context() -> Iterator[Any]:
    """One browser and one context for the module, so Gradio's scripts are fetched once."""
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright, CHROMIUM)
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        yield context
        context.close()
        chromium.close()


@pytest.fixture
def page(browser_context: Any, upstream: FakeOpenAI) -> Iterator[Page]:
    """A fresh tab per test; uncaught script errors on the page fail the test."""
    upstream.reset()
    tab = browser_context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert not errors, f"script errors on the page: {errors}"


def open_page(page: Page, app: Served) -> None:
    """Load the page and wait until its load events filled the share URL (not for network idle:
    Gradio keeps a connection open)."""
    page.goto(app.url + "/", wait_until="domcontentloaded")
    expect(field(page, "share-url-openai")).not_to_have_value("")


def load_models(page: Page, credential: str) -> None:
    open_tab(page, "Test chat")
    type_kept(page, "chat-credential", credential)  # the tab's first render may drop what was typed
    page.locator("#chat-refresh-models").click()


def chat_requests(upstream: FakeOpenAI) -> list[Any]:
    return [r for r in upstream.requests if r.path == "/v1/chat/completions"]


# ---------------------------------------------------------------- connect and keys


def test_the_page_shows_the_url_to_share(page: Page, served: Served) -> None:
    open_page(page, served)
    expect(field(page, "share-url-openai")).to_have_value(f"{served.url}/proxy/openai/v1")
    expect(page.locator("#proxy-header")).to_contain_text("proxy key")


def test_on_a_space_the_share_url_is_the_space_host(
    page: Page, upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(
        upstream, tmp_path_factory.mktemp("space"), PROXY_KEY=PROXY_KEY, SPACE_HOST="me-proxy.hf.space,other.host"
    )
    with serve_whole_app(settings) as app:
        open_page(page, app)
        expect(field(page, "share-url-openai")).to_have_value("https://me-proxy.hf.space/proxy/openai/v1")
        page.goto("about:blank")  # close the page's open connection, or the server waits for it


def test_the_keys_table_shows_key_ids_and_states_never_the_keys(page: Page, served: Served) -> None:
    open_page(page, served)
    open_tab(page, "Keys")
    table = page.locator("#keys-table-openai")
    for secret, tier in ((PAID, "paid"), (SPARE, "trial")):
        row = table_row(page, "keys-table-openai", key_id("oai-", secret))
        expect(row).to_contain_text("active")
        expect(row).to_contain_text(tier)
    text = table.inner_text()
    html = page.content()
    for secret in SECRETS:
        assert secret not in text
        assert secret not in html


def test_no_secret_is_served_to_the_browser(page: Page, served: Served) -> None:
    open_page(page, served)
    open_tab(page, "Keys")
    expect(page.locator("#keys-table-openai")).to_contain_text(key_id("oai-", PAID))
    bodies = {"page": page.content()}
    for path in ("/config", "/status", "/gradio_api/info"):
        response = httpx.get(served.url + path, timeout=10)
        if path == "/config":
            assert response.status_code == 200
        bodies[path] = response.text
    for where, body in bodies.items():
        for secret in SECRETS:
            assert secret not in body, f"a secret is in {where}"


# ---------------------------------------------------------------- test chat


def test_a_chat_message_streams_a_reply_through_the_proxy(page: Page, served: Served, upstream: FakeOpenAI) -> None:
    open_page(page, served)
    load_models(page, PROXY_KEY)
    expect(page.locator("#chat-note")).to_contain_text("models available")
    pick_model(page, MODEL)
    expect(page.locator("#chat-model input")).to_have_value(MODEL)
    upstream.reset()  # the model list came from the fake; count only the chat from here

    page.evaluate(WATCH_BOT_JS)
    send_chat(page, "Hello there")
    expect(page.locator('#chat-box [data-testid="user"]').last).to_contain_text("Hello there")
    expect(page.locator('#chat-box [data-testid="bot"]').last).to_have_text(SIGNED_REPLY)

    seen: list[str] = page.evaluate("() => window.__botTexts")
    partial = [text for text in seen if text not in (FULL_REPLY, SIGNED_REPLY)]
    assert partial, f"the reply appeared at once, not streamed: {seen}"
    assert all(FULL_REPLY.startswith(text) for text in seen[:-1]), seen
    assert seen[-1].split() == SIGNED_REPLY.split()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)

    # It went through the proxy: one upstream call, with a pool key, never the proxy key.
    assert upstream.wait_for(lambda: len(chat_requests(upstream)) == 1)
    (sent,) = chat_requests(upstream)
    assert sent.key in POOL
    assert sent.json["model"] == MODEL and sent.json["stream"] is True
    assert sent.json["messages"] == [{"role": "user", "content": "Hello there"}]
    assert all(PROXY_KEY not in value for value in sent.headers.values())

    # The server accounted it, and the usage table shows that record after its next timer refresh.
    assert upstream.wait_for(lambda: len(served.runtime.ledger.recent()) == 1)
    (event,) = served.runtime.ledger.recent()
    assert (event["service"], event["model"], event["streamed"], event["tokens_out"]) == ("openai", MODEL, True, CHUNKS)
    open_tab(page, "Usage")
    cells = table_row(page, "usage-table", MODEL).get_by_role("gridcell")
    shown = [str(value) for value in event_rows([event])[0]]
    expect(cells).to_have_text(shown, timeout=2_000 + 2_000 * REFRESH_SECONDS)


def test_a_wrong_credential_shows_a_readable_error_and_reaches_nobody(
    page: Page, served: Served, upstream: FakeOpenAI
) -> None:
    open_page(page, served)
    load_models(page, "not-the-proxy-key")
    expect(page.locator("#chat-note")).to_contain_text("Not authorised")
    model = page.locator("#chat-model input")  # it takes a typed model name too
    model.fill(MODEL)
    model.press("Enter")
    expect(model).to_have_value(MODEL)

    send_chat(page, "Hello there")
    reply = page.locator('#chat-box [data-testid="bot"]').last
    expect(reply).to_contain_text("Not authorised")
    expect(reply).to_contain_text("401")
    expect(reply).to_contain_text("Enter your proxy key")
    assert upstream.requests == []


def test_the_model_preselected_on_load_is_one_the_proxy_serves(page: Page, served: Served) -> None:
    open_page(page, served)
    open_tab(page, "Test chat")
    expect(page.locator("#chat-note")).to_contain_text("press ↻")  # the page's load events ran
    preselected = page.locator("#chat-model input").input_value()
    listed = httpx.get(served.proxy() + "/models", headers={"Authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
    served_models = {m["id"] for m in listed.json()["data"]}
    assert preselected == "" or preselected in served_models, f"preselected {preselected!r}"


# ---------------------------------------------------------------- admin tab


@pytest.fixture(scope="module")
def user_token_app(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The whole app in user-token mode; skips while the admin API is not part of the app."""
    settings = _settings(upstream, tmp_path_factory.mktemp("users"), GATEKEEPER="user_token", ADMIN_KEY=ADMIN_KEY)
    with serve_whole_app(settings) as app:
        probe = httpx.get(app.url + "/admin/api/users", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        if probe.status_code == 404:
            pytest.skip("admin API not wired yet")
        assert probe.status_code == 200, probe.text
        yield app


def test_the_admin_creates_a_token_shown_once_that_then_chats(
    page: Page, user_token_app: Served, upstream: FakeOpenAI
) -> None:
    open_page(page, user_token_app)
    open_tab(page, "Admin")
    unlock_admin(page, ADMIN_KEY)
    expect(page.locator("#admin-status")).to_contain_text("Unlocked")
    area = page.locator("#admin-area")
    expect(area).to_be_visible()

    area.get_by_label("Nickname").first.fill("browser-friend")
    page.locator("#admin-create").click()
    expect(page.locator("#admin-status")).to_contain_text("Created a token for browser-friend")
    new_token = field(page, "admin-new-token")
    expect(new_token).not_to_have_value("")
    token = new_token.input_value()
    users = page.locator("#admin-users-table")
    expect(users).to_contain_text("browser-friend")
    expect(users).to_contain_text(token[:6] + "…")
    assert token not in users.inner_text()

    page.locator("#admin-new-token-done").click()  # "I copied it"
    expect(page.locator("#admin-new-token")).to_be_hidden()
    assert token not in page.content()

    load_models(page, token)
    expect(page.locator("#chat-note")).to_contain_text("models available")
    pick_model(page, MODEL)
    upstream.reset()
    send_chat(page, "Hi from a friend")
    expect(page.locator('#chat-box [data-testid="bot"]').last).to_have_text(SIGNED_REPLY)
    assert upstream.wait_for(lambda: len(chat_requests(upstream)) == 1)
    (sent,) = chat_requests(upstream)
    assert sent.key in POOL
    assert all(token not in value for value in sent.headers.values())


def test_a_wrong_admin_key_shows_an_error_and_unlocks_nothing(page: Page, user_token_app: Served) -> None:
    open_page(page, user_token_app)
    open_tab(page, "Admin")
    field(page, "admin-key").fill("not-the-admin-key")
    page.locator("#admin-unlock").click()
    expect(page.locator("#admin-status")).to_contain_text("Wrong admin key")
    expect(page.locator("#admin-area")).to_be_hidden()
    expect(page.locator("#admin-users-table")).to_be_hidden()
