"""Helpers for the browser tests: Debian's Chromium driven by Playwright, the whole app served
on a port it knows in advance, and small readers for the Gradio page."""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from typing import Any

from proxy.config import Settings
from tests.conftest import Served, serve

MISSING_CHROMIUM = (
    "Chromium is missing: install it with `apt-get install -y chromium` (Debian) to run the browser tests."
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]

# Records every distinct text of the last bot message, so a test sees each step of a stream
# even if it polls slower than the chunks arrive.
WATCH_BOT_JS = """() => {
  const box = document.querySelector('#chat-box');
  window.__botTexts = [];
  const record = () => {
    const bots = box.querySelectorAll('[data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    const seen = window.__botTexts;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  };
  new MutationObserver(record).observe(box, {subtree: true, childList: true, characterData: true});
}"""


def chromium_path() -> str | None:
    """The system Chromium (Debian's `chromium` package); Playwright's own builds are never used."""
    return shutil.which("chromium")


def launch_chromium(playwright: Any, executable: str) -> Any:
    """A headless browser with a fresh temporary profile (Playwright makes one per launch)."""
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)


def serve_whole_app(settings: Settings) -> AbstractContextManager[Served]:
    """Serve `build_app(settings, self_url)` on 127.0.0.1: the page calls the server's own URL."""
    from app import build_app

    return serve(lambda url: build_app(settings, self_url=url), settings)


# ---------------------------------------------------------------- reading and driving the page


def field(page: Any, elem_id: str) -> Any:
    """The text field inside a gr.Textbox (an <input> or a <textarea>, depending on its lines)."""
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def type_kept(tab: Any, elem_id: str, text: str) -> None:
    """Type `text` into the box `elem_id` until the box keeps it. Under a loaded suite a tab's first
    render could replace the box after the text was typed into it (the text was then lost)."""
    box = field(tab, elem_id)
    for _typing in range(5):
        box.fill(text)
        tab.wait_for_timeout(300)
        if box.input_value() == text:
            return


def unlock_admin(tab: Any, key: str) -> None:
    """Type the admin key and unlock: typed until the box keeps it (`type_kept`; the server said
    "Wrong admin key" when the first render dropped it), and once more if the send raced."""
    from playwright.sync_api import expect

    for _attempt in range(3):
        type_kept(tab, "admin-key", key)
        tab.locator("#admin-unlock").click()
        expect(tab.locator("#admin-status")).not_to_be_empty()
        status = tab.locator("#admin-status").inner_text()
        if tab.locator("#admin-area").is_visible() or "Wrong admin key" not in status:
            break
    expect(tab.locator("#admin-area")).to_be_visible()


def table_row(page: Any, elem_id: str, text: str) -> Any:
    """The visible row of a gr.Dataframe holding `text` (Gradio also renders hidden sizing rows)."""
    return page.locator(f"#{elem_id}").get_by_role("row").filter(has_text=text)


def open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def pick_model(page: Any, model: str) -> None:
    """Open the model dropdown and click an option of the list."""
    page.locator("#chat-model input").click()
    page.get_by_role("option", name=model, exact=True).click()


def send_chat(page: Any, text: str) -> None:
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")
