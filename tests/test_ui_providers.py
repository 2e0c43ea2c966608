"""The page's cards for the new providers: share URLs, set-up snippets and chat routing."""

from __future__ import annotations

from ui.chat import LISTED_BY, service_for_model
from ui.common import service_label
from ui.connect import share_urls, snippets


def test_gemini_card_shows_sillytavern_google_ai_studio_the_genai_sdk_and_the_openai_door() -> None:
    items = {s.title: s.code for s in snippets("google-ai", "https://space.example", "proxy_key")}
    assert "Google AI Studio" in items["SillyTavern"]
    assert "Proxy Server URL:  https://space.example/proxy/google-ai\n" in items["SillyTavern"]
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
