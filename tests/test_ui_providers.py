"""The page's cards for the new providers: share URLs, set-up snippets and chat routing."""

from __future__ import annotations

from ui.chat import LISTED_BY, service_for_model
from ui.common import service_label
from ui.connect import share_urls, snippets


def test_gemini_card_shows_sillytavern_google_ai_studio_the_genai_sdk_and_the_openai_door() -> None:
    items = {s.title: s.code for s in snippets("google-ai", "https://space.example", "proxy_key")}
    assert "Google AI Studio" in items["SillyTavern"]
    steps = items["SillyTavern"]
    assert "Proxy Server URL" in steps and "   https://space.example/proxy/google-ai\n" in steps  # no /v1
    assert '"base_url": "https://space.example/proxy/google-ai"' in items["Google Gen AI SDK"]
    assert 'base_url="https://space.example/proxy/google-ai/v1"' in items["OpenAI SDK (OpenAI format)"]
    assert "x-goog-api-key: YOUR_PROXY_KEY" in items["curl"]


def test_a_compatible_service_card_points_sillytavern_to_its_custom_source() -> None:
    steps = snippets("lab", "https://space.example", "none")[0].code
    assert "Custom (OpenAI-compatible)" in steps and "https://space.example/proxy/lab/v1" in steps
    assert share_urls("https://space.example", ("deepseek",)) == {"deepseek": "https://space.example/proxy/deepseek/v1"}
    assert service_label("mistral-ai") == "Mistral AI" and service_label("lab") == "lab"


def test_the_test_chat_sends_each_model_to_the_service_that_serves_it() -> None:
    services = ("openai", "google-ai", "deepseek", "lab")
    assert service_for_model("gemini-2.5-flash", services) == "google-ai"
    LISTED_BY["qwen2.5-7b-instruct"] = "lab"
    try:
        assert service_for_model("qwen2.5-7b-instruct", services) == "lab"
    finally:
        LISTED_BY.pop("qwen2.5-7b-instruct")
    assert service_for_model("gpt-4o", services) == "openai"


def test_the_whole_app_shows_a_card_per_new_service_and_no_key(tmp_path) -> None:
    import httpx

    from tests.browser_util import serve_whole_app
    from tests.conftest import make_settings

    gemini_key, lab_key = "AIzaSyPage0123456789abcdefghijklmnopqr", "lab-secret-0123456789"
    env = {
        "GOOGLE_AI_KEY": gemini_key, "GOOGLE_AI_BASE_URL": "http://127.0.0.1:9",
        "CUSTOM_UPSTREAMS": "lab=http://127.0.0.1:9/v1", "LAB_KEY": lab_key, "PROXY_KEY": "pk-page-0123456789",
    }  # fmt: skip
    settings = make_settings(env, tmp_path)
    with serve_whole_app(settings) as served, httpx.Client(base_url=served.url, trust_env=False) as client:
        config = client.get("/config").text
        status = client.get("/status").text
    for elem in ("share-url-google-ai", "share-url-lab", "keys-table-google-ai", "keys-table-lab"):
        assert elem in config
    assert "Google AI (Gemini)" in config
    for secret in (gemini_key, lab_key, "pk-page-0123456789"):
        assert secret not in config and secret not in status
