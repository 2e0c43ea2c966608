"""The page built after the proxy starts serving (app.build_app(page_later=True), as `python app.py`
runs it): what "/" says meanwhile, and that a page that cannot be built leaves the proxy serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

import app as app_module
from tests.conftest import PAID, PROXY_KEY, make_settings, serve
from tests.fakes import FakeOpenAI

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}


def env(fake_openai: FakeOpenAI) -> dict[str, str]:
    return {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY}


def test_the_proxy_serves_while_the_page_is_built_and_the_page_then_takes_over(
    tmp_path: Path, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(env(fake_openai), tmp_path)
    release = threading.Event()
    real = app_module.build_page

    def slow_build(*args: object) -> object:
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(app_module, "build_page", slow_build)
    with serve(lambda url: app_module.build_app(settings, self_url=url, page_later=True), settings) as served:
        starting = httpx.get(f"{served.url}/", timeout=5)
        assert starting.status_code == 503 and b"The page is starting" in starting.content
        assert httpx.get(f"{served.url}/config", timeout=5).status_code == 503  # Gradio's routes too
        reply = httpx.post(f"{served.proxy()}/chat/completions", json=CHAT, headers=AUTH, timeout=10)
        assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"
        release.set()
        deadline = time.monotonic() + 60
        while (page := httpx.get(f"{served.url}/", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, "the page never appeared"
            time.sleep(0.2)
        assert b"gradio" in page.content.lower()
        config = httpx.get(f"{served.url}/config", timeout=10)
        assert config.status_code == 200 and PAID not in config.text
        # and the proxy's routes still go first
        assert httpx.get(f"{served.url}/health", timeout=5).json() == {"status": "ok", "database": "ok"}


def test_a_page_that_cannot_be_built_leaves_the_proxy_serving(
    tmp_path: Path, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(env(fake_openai), tmp_path)

    def broken(*args: object) -> object:
        raise RuntimeError("the page broke")

    monkeypatch.setattr(app_module, "build_page", broken)
    with serve(lambda url: app_module.build_app(settings, self_url=url, page_later=True), settings) as served:
        deadline = time.monotonic() + 30
        while (page := httpx.get(f"{served.url}/", timeout=5)).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert page.status_code == 500 and page.content == b"The page is unavailable; the proxy works."
        reply = httpx.post(f"{served.proxy()}/chat/completions", json=CHAT, headers=AUTH, timeout=10)
        assert reply.status_code == 200
    assert any("the page could not be built" in r.getMessage() for r in caplog.records)


def test_the_page_queue_does_not_wake_the_event_loop_every_millisecond_while_idle(
    tmp_path: Path, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradio's queue looks for work in a loop that sleeps 1 ms when there is none: ~1,000 turns a
    second in the loop that relays every stream. The page's queue sleeps PAGE_QUEUE_POLL_S."""
    from gradio import queueing

    turns = [0]
    real_len = queueing.Queue.__len__

    def counted(self: queueing.Queue) -> int:  # start_processing asks it once per turn
        turns[0] += 1
        return real_len(self)

    monkeypatch.setattr(queueing.Queue, "__len__", counted)
    settings = make_settings(env(fake_openai), tmp_path)
    with serve(lambda url: app_module.build_app(settings, self_url=url, page_later=True), settings) as served:
        deadline = time.monotonic() + 60
        while httpx.get(f"{served.url}/", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the page never appeared"
            time.sleep(0.2)
        time.sleep(0.5)
        before = turns[0]
        time.sleep(2.0)
        per_second = (turns[0] - before) / 2.0
    assert 0 < per_second <= 2 / app_module.PAGE_QUEUE_POLL_S, per_second  # 1 ms sleeps: ~1,000 a second
