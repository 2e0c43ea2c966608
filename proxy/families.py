"""Model families: one table, read top to bottom, first match wins. Easy to extend."""

from __future__ import annotations

import re

# (family, service, pattern). Order matters: more specific patterns first.
FAMILIES: list[tuple[str, str, re.Pattern[str]]] = [
    (family, service, re.compile(pattern))
    for family, service, pattern in [
        ("fine-tune", "openai", r"^ft:"),
        ("embeddings", "openai", r"^text-embedding-|^text-similarity-|^text-search-"),
        ("dall-e", "openai", r"^dall-e|^gpt-image"),
        ("audio", "openai", r"^whisper|^tts-|^gpt-4o(-mini)?-(audio|realtime|transcribe|tts)"),
        ("moderation", "openai", r"^omni-moderation|^text-moderation"),
        ("gpt-5", "openai", r"^gpt-5"),
        ("gpt-4.1", "openai", r"^gpt-4\.1"),
        ("gpt-4.5", "openai", r"^gpt-4\.5"),
        ("gpt-4o-mini", "openai", r"^gpt-4o-mini"),
        ("gpt-4o", "openai", r"^gpt-4o|^chatgpt-4o"),
        ("gpt-4-turbo", "openai", r"^gpt-4-turbo|^gpt-4-\d{4}-preview|^gpt-4-vision"),
        ("gpt-4-32k", "openai", r"^gpt-4-32k"),
        ("gpt-4", "openai", r"^gpt-4"),
        ("gpt-3.5-turbo", "openai", r"^gpt-3\.5-turbo"),
        ("o-series", "openai", r"^o\d"),
        ("gpt-oss", "openai", r"^gpt-oss"),
        ("legacy-completions", "openai", r"^(babbage|davinci|text-davinci|gpt-3\.5-turbo-instruct)"),
        ("claude-opus", "anthropic", r"^claude-(opus|3-opus)|^claude-[\d.-]+-opus"),
        ("claude-sonnet", "anthropic", r"^claude-(sonnet|3-sonnet|3-5-sonnet|3-7-sonnet)|^claude-[\d.-]+-sonnet"),
        ("claude-haiku", "anthropic", r"^claude-(haiku|3-haiku|3-5-haiku)|^claude-[\d.-]+-haiku"),
        ("claude", "anthropic", r"^claude"),
    ]
]

# Families that are not text generation: never served unless ALLOWED_MODEL_FAMILIES names them.
NON_TEXT = {"dall-e", "audio", "moderation"}


def family_of(model: str, service: str = "openai") -> str:
    """The family of a model id; unknown models fall back to a per-service family."""
    name = (model or "").strip().lower()
    for family, owner, pattern in FAMILIES:
        if pattern.search(name):
            return family
    return "other" if service == "openai" else f"{service}-other"


def is_allowed(family: str, allowed: set[str]) -> bool:
    """With no filter, every text family is served; otherwise exactly the listed ones."""
    if allowed:
        return family in allowed
    return family not in NON_TEXT
