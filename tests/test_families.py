"""Model families: which family each model belongs to, and which families the proxy serves."""

from __future__ import annotations

import pytest

from proxy.families import FAMILIES, families_of, family_of, is_allowed, known_families


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("chatgpt-4o-latest", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1", "gpt-4.1"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini", "gpt-4.1-mini"),
        ("gpt-4.1-nano", "gpt-4.1-mini"),
        ("gpt-4", "gpt-4"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo", "gpt-4-turbo"),
        ("gpt-4-0125-preview", "gpt-4-turbo"),
        ("gpt-4-1106-vision-preview", "gpt-4-turbo"),
        ("gpt-4-32k", "gpt-4-32k"),
        ("gpt-3.5-turbo", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-instruct", "gpt-3.5-turbo"),
        ("o1", "o-series"),
        ("o1-pro", "o-series"),
        ("o3-mini", "o-series"),
        ("o4-mini", "o-series"),
        ("gpt-5", "gpt-5"),
        ("gpt-5-mini", "gpt-5-mini"),
        ("text-embedding-3-small", "embeddings"),
        ("text-embedding-ada-002", "embeddings"),
        ("ft:gpt-4o-mini:org::abc123", "fine-tune"),
        ("ft:gpt-3.5-turbo:acme:custom:id", "fine-tune"),
        ("dall-e-3", "dall-e"),
        ("gpt-image-1", "dall-e"),
        ("whisper-1", "audio"),
        ("tts-1", "audio"),
        ("gpt-4o-mini-audio-preview", "audio"),
        ("gpt-4o-realtime-preview", "audio"),
        ("omni-moderation-latest", "moderation"),
        ("babbage-002", "legacy-completions"),
        ("claude-3-opus-20240229", "claude-opus"),
        ("claude-opus-4-20250514", "claude-opus"),
        ("claude-opus-4-1-20250805", "claude-opus"),
        ("claude-3-5-sonnet-20241022", "claude-sonnet"),
        ("claude-3-7-sonnet-latest", "claude-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet"),
        ("claude-sonnet-4-5", "claude-sonnet"),
        ("claude-3-haiku-20240307", "claude-haiku"),
        ("claude-3-5-haiku-20241022", "claude-haiku"),
        ("claude-haiku-4-5", "claude-haiku"),
        ("claude-2.1", "claude"),
        ("Claude-3-Opus-20240229", "claude-opus"),
        ("gemini-2.5-flash", "gemini-flash"),
        ("gemini-2.0-flash-001", "gemini-flash"),
        ("gemini-flash-latest", "gemini-flash"),
        ("gemini-2.5-flash-lite", "gemini-flash-lite"),
        ("gemini-2.0-flash-lite-preview-02-05", "gemini-flash-lite"),
        ("gemini-2.5-pro", "gemini-pro"),
        ("gemini-1.5-pro-002", "gemini-pro"),
        ("models/gemini-2.5-pro-preview-06-05", "gemini-pro"),
        ("gemini-exp-1206", "gemini"),
        ("gemma-3-27b-it", "gemma"),
        ("gemini-embedding-001", "gemini-embedding"),
        ("imagen-4.0-generate-001", "imagen"),
        ("deepseek-chat", "deepseek"),
        ("deepseek-reasoner", "deepseek-reasoner"),
        ("grok-4", "grok"),
        ("mistral-large-latest", "mistral-large"),
        ("mistral-small-latest", "mistral"),
        ("codestral-latest", "mistral"),
    ],
)
def test_every_known_model_has_its_family(model: str, family: str) -> None:
    assert family_of(model) == family


def test_unknown_models_fall_back_to_a_family_per_service() -> None:
    assert family_of("llama-3-70b") == "other"
    assert family_of("mystery", "anthropic") == "anthropic-other"
    assert family_of("") == "other"


def test_fine_tunes_are_apart_from_their_base_model() -> None:
    assert family_of("ft:gpt-4o-mini:org::abc123") != family_of("gpt-4o-mini")


def test_every_row_of_the_table_is_reachable() -> None:
    """A row shadowed by an earlier, broader row would be dead; each row must win for some model."""
    examples = {
        "fine-tune": "ft:x",
        "embeddings": "text-embedding-3-large",
        "dall-e": "dall-e-2",
        "audio": "whisper-1",
        "moderation": "text-moderation-latest",
        "gpt-5-mini": "gpt-5-nano",
        "gpt-5": "gpt-5-pro",
        "gpt-4.1-mini": "gpt-4.1-mini",
        "gpt-4.1": "gpt-4.1",
        "gpt-4.5": "gpt-4.5-preview",
        "gpt-4o-mini": "gpt-4o-mini",
        "gpt-4o": "gpt-4o",
        "gpt-4-turbo": "gpt-4-turbo-preview",
        "gpt-4-32k": "gpt-4-32k-0613",
        "gpt-4": "gpt-4",
        "gpt-3.5-turbo": "gpt-3.5-turbo-16k",
        "o-series": "o3",
        "gpt-oss": "gpt-oss-120b",
        "legacy-completions": "davinci-002",
        "claude-opus": "claude-3-opus-20240229",
        "claude-sonnet": "claude-3-sonnet-20240229",
        "claude-haiku": "claude-3-haiku-20240307",
        "claude": "claude-instant-1.2",
        "imagen": "veo-3.0-generate-preview",
        "gemini-embedding": "embedding-001",
        "gemini-flash-lite": "gemini-flash-lite-latest",
        "gemini-flash": "gemini-1.5-flash-8b",
        "gemini-pro": "gemini-pro-latest",
        "gemini": "gemini-exp-1206",
        "gemma": "gemma-3n-e4b-it",
        "deepseek-reasoner": "deepseek-r1-distill-llama-70b",
        "deepseek": "deepseek-coder",
        "grok": "grok-3-mini",
        "mistral-large": "mistral-large-2411",
        "mistral": "magistral-medium-latest",
    }
    assert {family for family, _, _ in FAMILIES} == set(examples)
    for family, model in examples.items():
        assert family_of(model) == family, model


def test_families_of_lists_each_family_once_in_order() -> None:
    assert families_of(["gpt-4o", "gpt-4o-2024-08-06", "gpt-3.5-turbo"]) == ["gpt-3.5-turbo", "gpt-4o"]


def test_known_families_cover_the_fallbacks() -> None:
    assert {"gpt-4o", "embeddings", "claude-sonnet", "other", "anthropic-other"} <= known_families()


def test_without_a_filter_every_text_family_is_served_but_images_audio_and_moderation_are_not() -> None:
    for family in ("gpt-4o", "gpt-4o-mini", "o-series", "embeddings", "fine-tune", "claude-opus", "other"):
        assert is_allowed(family, set())
    for family in ("dall-e", "audio", "moderation"):
        assert not is_allowed(family, set())


def test_a_filter_serves_exactly_the_families_it_names() -> None:
    allowed = {"gpt-4o-mini", "dall-e"}
    assert is_allowed("gpt-4o-mini", allowed)
    assert is_allowed("dall-e", allowed)
    assert not is_allowed("gpt-4o", allowed)


def test_unknown_models_of_a_compatible_service_are_the_service_family() -> None:
    """A local vLLM's "qwen2.5-7b" is family "lab"; Gemini's and Claude's unknowns are "<service>-other"."""
    assert family_of("qwen2.5-7b-instruct", "lab") == "lab"
    assert family_of("llama-3.3-70b-versatile", "groq") == "groq"
    assert family_of("aqa", "google-ai") == "google-ai-other"
    assert family_of("some-model", "anthropic") == "anthropic-other"
    assert family_of("deepseek-chat", "lab") == "deepseek"  # a known model keeps its family anywhere


def test_image_and_video_models_of_google_are_not_served_without_naming_them() -> None:
    assert not is_allowed(family_of("imagen-4.0-generate-001", "google-ai"), set())
    assert is_allowed(family_of("gemini-2.5-flash", "google-ai"), set())
