"""The page as friends and owners meet it (issue 15), in headless Chromium at desktop width and at
390 px (a phone): every tab is walked, checked, and kept as a screenshot in artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser_util import (
    MISSING_CHROMIUM,
    chromium_path,
    field,
    launch_chromium,
    open_tab,
    send_chat,
    serve_whole_app,
    type_kept,
    unlock_admin,
)
from tests.conftest import PAID, PROXY_KEY, Served, make_settings
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour

CHROMIUM = chromium_path()
if CHROMIUM is None:
    pytest.skip(MISSING_CHROMIUM, allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402 - only with Chromium

ANT = "sk-ant-paid-0123456789"
ADMIN_KEY = "admin-key-for-page-tests-15"
INFO = "info-password-page-15"
OPENAI_MODELS = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
CLAUDE_MODELS = ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"]
GREETING = "**Welcome, friends!** Be kind.\n\n<script>window.__greeted = 1</script><b>not bold</b>"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
TABS = ("Connect", "Keys", "Usage", "Test chat", "My usage", "Admin")

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeAnthropic]]:
    with (
        FakeOpenAI({PAID: KeyBehaviour("paid", models=OPENAI_MODELS)}, chunks=4) as openai,
        FakeAnthropic({ANT: KeyBehaviour("paid", models=CLAUDE_MODELS)}) as anthropic,
    ):
        yield openai, anthropic


def _serve(upstreams: tuple[FakeOpenAI, FakeAnthropic], tmp: Path, **env: str) -> Any:
    openai, anthropic = upstreams
    base = {
        "OPENAI_KEY": PAID,
        "OPENAI_BASE_URL": openai.base_url,
        "ANTHROPIC_KEY": ANT,
        "ANTHROPIC_BASE_URL": anthropic.base_url,
        "CHECK_KEYS": "true",
        "ADMIN_KEY": ADMIN_KEY,
    }
    return serve_whole_app(make_settings({**base, **env}, tmp))


def _checked(app: Served, upstream: FakeOpenAI) -> None:
    keys = lambda: app.runtime.status()["keys"]  # noqa: E731
    assert upstream.wait_for(lambda: all(s["unchecked"] == 0 and not s["checking"] for s in keys().values()), 15)


@pytest.fixture(scope="module")
def owner_app(upstreams: tuple[FakeOpenAI, FakeAnthropic], tmp_path_factory: pytest.TempPathFactory):
    """User tokens, errors as chat, a greeting, costs shown, status behind a password."""
    with _serve(
        upstreams,
        tmp_path_factory.mktemp("owner"),
        GATEKEEPER="user_token",
        ERRORS_AS_CHAT="true",
        GREETING=GREETING,
        SHOW_TOKEN_COSTS="true",
        SERVICE_INFO_PASSWORD=INFO,
    ) as app:
        _checked(app, upstreams[0])
        yield app


@pytest.fixture(scope="module")
def proxy_key_app(upstreams: tuple[FakeOpenAI, FakeAnthropic], tmp_path_factory: pytest.TempPathFactory):
    with _serve(upstreams, tmp_path_factory.mktemp("pk"), PROXY_KEY=PROXY_KEY) as app:
        _checked(app, upstreams[0])
        yield app


@pytest.fixture(scope="module", params=list(VIEWPORTS))
def browser_page(request: pytest.FixtureRequest) -> Iterator[tuple[str, Page]]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright, CHROMIUM)
        context = chromium.new_context(viewport=VIEWPORTS[request.param])
        yield request.param, context
        context.close()
        chromium.close()


@pytest.fixture
def page(browser_page: tuple[str, Any]) -> Iterator[tuple[str, Page]]:
    width, context = browser_page
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield width, tab
    tab.goto("about:blank")  # close the page's open connection, or the server waits for it
    tab.close()
    assert not errors, f"script errors on the page: {errors}"


def shot(page: Page, width: str, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page-{width}-{name}.png"), full_page=True)


def fits_the_screen(page: Page) -> None:
    """Nothing makes the page itself wider than the window (tables may scroll inside)."""
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page is {overflow}px wider than the window"


def open_page(page: Page, app: Served) -> None:
    page.goto(app.url + "/", wait_until="domcontentloaded")
    expect(field(page, "share-url-openai")).not_to_have_value("")


def create_token(app: Served, **limits: int) -> str:
    return app.runtime.access.users.create(nickname="page-friend", token_limits=limits or None).token


# ---------------------------------------------------------------- a friend


def test_connect_shows_the_right_url_per_client_and_served_models(page: tuple[str, Page], owner_app: Served) -> None:
    width, tab = page
    open_page(tab, owner_app)
    for name in TABS:  # every tab in reach: none behind an overflow menu
        expect(tab.get_by_role("tab", name=name, exact=True)).to_be_visible()
    expect(tab.locator("#main-tabs .overflow-menu")).to_be_hidden()

    expect(field(tab, "share-url-anthropic")).to_have_value(f"{owner_app.url}/proxy/anthropic/v1")
    expect(field(tab, "share-url-anthropic-native")).to_have_value(f"{owner_app.url}/proxy/anthropic")
    openai_card = tab.locator(".service-card").first
    steps = openai_card.locator(".steps").first
    expect(steps.locator("ol > li")).to_have_count(5)  # numbered steps, aligned at any width
    expect(steps).to_contain_text(f"{owner_app.url}/proxy/openai/v1")
    expect(steps).to_contain_text("gpt-4o-mini")

    claude_card = tab.locator(".service-card").nth(1)
    claude_card.get_by_role("button", name="Set-up instructions").click()
    claude_card.get_by_role("tab", name="Anthropic SDK").click()
    code = claude_card.locator(".cm-content").first
    expect(code).to_contain_text(f'base_url="{owner_app.url}/proxy/anthropic"')
    expect(code).to_contain_text("claude-haiku-4-5")  # a model the keys serve
    assert "claude-3-5-haiku-latest" not in tab.content()

    greeting = tab.locator("#greeting")
    expect(greeting.locator("strong")).to_have_text("Welcome, friends!")
    expect(greeting).to_contain_text("<script>")  # shown as text, never run
    assert greeting.locator("script, b").count() == 0
    assert tab.evaluate("() => window.__greeted") is None
    fits_the_screen(tab)
    shot(tab, width, "connect")


def test_test_chat_loads_models_on_entry_drops_unanswered_turns_and_names_the_model(
    page: tuple[str, Page], owner_app: Served, upstreams: tuple[FakeOpenAI, FakeAnthropic]
) -> None:
    width, tab = page
    openai, _ = upstreams
    token = create_token(owner_app)
    open_page(tab, owner_app)
    open_tab(tab, "Test chat")
    placeholder = tab.locator("#chat-input textarea").get_attribute("placeholder")
    assert placeholder

    type_kept(tab, "chat-credential", token)  # no button: the list loads once the token is in
    expect(tab.locator("#chat-note")).to_contain_text("models available")
    tab.locator("#chat-model input").click()
    options = tab.get_by_role("option")
    expect(options.first).to_be_visible()
    names = [n.replace("✓", "").strip() for n in options.all_inner_texts()]
    assert "gpt-4o-mini" in names and "claude-haiku-4-5-20251001" in names
    assert not any("embedding" in n for n in names), names  # only chat models
    tab.get_by_role("option", name="gpt-4o-mini", exact=True).click()

    field(tab, "chat-credential").fill("not-a-token")
    tab.locator("#chat-input textarea").click()  # leaving the box
    send_chat(tab, "hello, anyone there?")
    bot = tab.locator('#chat-box [data-testid="bot"]').last
    expect(bot).to_contain_text("user token is not valid")  # a refusal (ERRORS_AS_CHAT) as a note

    field(tab, "chat-credential").fill(token)
    openai.reset()
    send_chat(tab, "first real message")
    expect(tab.locator('#chat-box [data-testid="bot"]')).to_have_count(2)
    reply = tab.locator('#chat-box [data-testid="bot"]').last
    expect(reply).to_contain_text("answered by gpt-4o-mini")
    sent = [r.json for r in openai.requests if r.path == "/v1/chat/completions"]
    assert [m["content"] for m in sent[-1]["messages"]] == ["first real message"]
    expect(tab.locator("#chat-input textarea")).to_have_attribute("placeholder", placeholder)
    expect(tab.locator("#chat-input textarea")).to_be_editable()
    fits_the_screen(tab)
    shot(tab, width, "chat")


# ---------------------------------------------------------------- an owner


def test_status_and_usage_need_the_password_and_count_every_outcome(
    page: tuple[str, Page], owner_app: Served
) -> None:
    width, tab = page
    friend = create_token(owner_app)
    proxy = owner_app.proxy()
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
    httpx.post(proxy + "/chat/completions", json=chat, headers={"Authorization": f"Bearer {friend}"}, timeout=20)
    httpx.post(proxy + "/chat/completions", json=chat, headers={"Authorization": "Bearer wrong"}, timeout=20)
    unserved = {**chat, "model": "gpt-4-turbo"}
    httpx.post(proxy + "/chat/completions", json=unserved, headers={"Authorization": f"Bearer {friend}"}, timeout=20)

    open_page(tab, owner_app)
    open_tab(tab, "Keys")
    expect(tab.locator("#keys-families-openai")).to_be_visible()
    expect(tab.get_by_text("Enter the service info password").first).to_be_visible()
    assert "oai-" not in tab.locator("#main-tabs").inner_text()
    field(tab, "info-password").fill(INFO)
    tab.locator("#info-show").click()
    families = tab.locator("#keys-families-openai")
    expect(families).to_contain_text("gpt-4o-mini")
    expect(families.get_by_role("row").filter(has_text="gpt-4o-mini")).to_contain_text("1")
    expect(tab.locator("#proxy-header")).to_contain_text("in the last minute")
    if width == "phone":  # the key table keeps Key and Status on screen
        status_cell = tab.locator("#keys-table-openai").get_by_role("gridcell").filter(has_text="active").first
        box = status_cell.bounding_box()
        assert box is not None and box["x"] + box["width"] <= 390 and box["width"] > 60, box
    fits_the_screen(tab)
    shot(tab, width, "keys")

    open_tab(tab, "Usage")
    totals = tab.locator("#usage-totals")
    expect(totals).to_contain_text("refused by the proxy")
    expect(totals).to_contain_text("wrong key")
    expect(totals).to_contain_text("model")
    expect(totals).to_contain_text("estimated cost")
    tab.wait_for_timeout(1000)
    shot(tab, width, "usage")
    plot = tab.locator("#usage-requests-plot svg.marks, #usage-requests-plot canvas.marks").first
    expect(plot).to_be_visible()
    expect(tab.locator("#usage-legend")).to_contain_text("refused: wrong key")
    plot_box = plot.bounding_box()
    assert plot_box is not None and plot_box["width"] > 250 and plot_box["height"] > 150, plot_box
    table = tab.locator("#usage-table")
    expect(table).to_contain_text("refused: wrong key (401)")
    if width == "phone":  # the outcome column stays on screen without scrolling the table
        cell = table.get_by_role("gridcell").filter(has_text="refused: wrong key").first
        box = cell.bounding_box()
        assert box is not None and box["x"] + box["width"] / 2 < 390, box
    fits_the_screen(tab)
    shot(tab, width, "usage")


def test_admin_form_accepts_its_placeholder_and_offers_the_families(page: tuple[str, Page], owner_app: Served) -> None:
    width, tab = page
    open_page(tab, owner_app)
    open_tab(tab, "My usage")
    expect(tab.locator("#me-token")).to_be_visible()
    open_tab(tab, "Admin")
    unlock_admin(tab, ADMIN_KEY)
    limits = field(tab, "admin-new-limits")
    limits.fill(limits.get_attribute("placeholder") or "")
    tab.locator("#admin-limit-family input").click()
    expect(tab.get_by_role("option", name="claude-haiku", exact=True)).to_be_visible()
    tab.get_by_role("option", name="claude-haiku", exact=True).click()
    tab.locator("#admin-area").get_by_label("Tokens").fill("7000")
    tab.locator("#admin-limit-add").click()
    expect(limits).to_have_value("gpt-4o=100000, claude-sonnet=50000, claude-haiku=7000")
    tab.locator("#admin-area").get_by_label("Nickname").first.fill(f"limited-{width}")
    tab.locator("#admin-create").click()
    expect(tab.locator("#admin-status")).to_contain_text(f"Created a token for limited-{width}")
    users = owner_app.runtime.access.users
    (made,) = [u for u in users.all() if u.nickname == f"limited-{width}"]
    assert made.token_limits == {"gpt-4o": 100000, "claude-sonnet": 50000, "claude-haiku": 7000}
    fits_the_screen(tab)
    shot(tab, width, "admin")
    open_tab(tab, "My usage")
    shot(tab, width, "me")


def test_in_proxy_key_mode_nothing_that_cannot_work_is_offered(page: tuple[str, Page], proxy_key_app: Served) -> None:
    width, tab = page
    open_page(tab, proxy_key_app)
    expect(tab.get_by_role("tab", name="My usage", exact=True)).to_have_count(0)
    open_tab(tab, "Admin")
    expect(tab.locator("#admin-mode")).to_contain_text("GATEKEEPER=user_token")
    field(tab, "admin-key").fill(ADMIN_KEY)
    tab.locator("#admin-unlock").click()
    expect(tab.locator("#admin-recheck")).to_be_visible()
    expect(tab.get_by_text("Create a user token")).to_be_hidden()
    expect(tab.locator("#admin-create")).to_be_hidden()
    fits_the_screen(tab)
    shot(tab, width, "admin-proxy-key")
