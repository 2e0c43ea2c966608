"""The page's pure pieces for issue 15: snippets from served models, the history sent upstream,
chat-only model lists, per-family status with a queue, the admin form's limits, the greeting."""

from __future__ import annotations

import pytest

from ui.admin_api import add_limit, mode_note, parse_limits
from ui.chat import ERROR_MARK, footer, model_ids, normalise_history
from ui.common import UIContext, preferred_model, safe_markdown
from ui.connect import example_model, native_url, snippets
from ui.keys import family_rows


def ctx(models: dict[str, list[str]]) -> UIContext:
    return UIContext(
        title="t",
        self_url="http://x",
        space_host=None,
        space_id=None,
        services=tuple(models),
        auth_mode="proxy_key",
        status=dict,
        recent=lambda n: [],
        models=lambda service: models[service],
    )


def test_snippets_name_a_model_the_live_keys_serve() -> None:
    served = ctx({"anthropic": ["claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001"], "openai": ["gpt-4.1"]})
    assert example_model(served, "anthropic") == "claude-haiku-4-5-20251001"
    assert example_model(served, "openai") == "gpt-4.1"
    codes = "".join(s.code for s in snippets("anthropic", "https://p", "proxy_key", "claude-haiku-4-5-20251001"))
    assert "claude-haiku-4-5-20251001" in codes and "claude-3-5-haiku-latest" not in codes
    assert example_model(ctx({"openai": []}), "openai") == "gpt-4o-mini"  # nothing listed yet


def test_anthropic_native_clients_get_the_base_url_without_v1() -> None:
    items = {s.title: s.code for s in snippets("anthropic", "https://p.hf.space", "none", "claude-haiku-4-5")}
    assert native_url("https://p.hf.space/", "anthropic") == "https://p.hf.space/proxy/anthropic"
    assert 'base_url="https://p.hf.space/proxy/anthropic"' in items["LangChain / litellm"]
    assert 'api_base="https://p.hf.space/proxy/anthropic"' in items["LangChain / litellm"]
    assert "/proxy/anthropic/v1" in items["SillyTavern"]


def test_an_unanswered_turn_is_not_sent_again_and_model_footers_stay_home() -> None:
    history = [
        {"role": "user", "content": "hello, anyone there?"},
        {"role": "assistant", "content": ERROR_MARK + "**Not authorised (401): no**"},
        {"role": "user", "content": "first real message"},
        {"role": "assistant", "content": "Hi!" + footer("gpt-4o-mini-2024-07-18")},
    ]
    assert normalise_history(history, "and now?") == [
        {"role": "user", "content": "first real message"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "and now?"},
    ]


def test_the_test_chat_offers_only_chat_models() -> None:
    listed = {"data": [{"id": m} for m in ("gpt-4o-mini", "text-embedding-3-small", "dall-e-3", "tts-1", "o3-mini")]}
    assert model_ids(listed) == ["gpt-4o-mini", "o3-mini"]
    assert preferred_model(["text-embedding-3-small"]) is None


def test_family_status_shows_the_queue_only_when_reported() -> None:
    status = {"by_family": {"gpt-4o": {"active": 2, "limited": 1, "revoked": 0}}}
    assert family_rows(status) == [["gpt-4o", 2, 1, 0, "—", "—"]]
    queue = {"gpt-4o": {"waiting": 3, "estimated_wait_s": 75}}
    assert family_rows(status, queue) == [["gpt-4o", 2, 1, 0, 3, "1m 15s"]]


def test_the_limits_placeholder_is_accepted_as_typed_and_families_can_be_added() -> None:
    assert parse_limits("gpt-4o=100000, claude-sonnet=50000") == {"gpt-4o": 100000, "claude-sonnet": 50000}
    assert add_limit("gpt-4o=100000", "claude-haiku", 7000) == "gpt-4o=100000, claude-haiku=7000"
    assert add_limit("gpt-4o=1", "gpt-4o", 5) == "gpt-4o=5"
    with pytest.raises(ValueError):
        add_limit("", None, 5)


def test_each_access_mode_says_what_the_admin_tab_can_do() -> None:
    assert "GATEKEEPER=user_token" in mode_note("proxy_key") and "refused" in mode_note("proxy_key")
    assert "no password" in mode_note("none")
    assert "user token" in mode_note("user_token")


def test_the_greeting_shows_html_as_text() -> None:
    text = safe_markdown("**hi** <script>alert(1)</script> <img src=x onerror=alert(1)>")
    assert "**hi**" in text and "<script>" not in text and "<img" not in text and "&lt;script&gt;" in text
