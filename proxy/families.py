"""Model families: one table, read top to bottom, first match wins. Easy to extend.

A family groups models that cost and behave alike. It names what the proxy serves
(`ALLOWED_MODEL_FAMILIES`), what quotas count, and what the key table shows. To add a model,
add a row above any broader row that would otherwise catch it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

# (family, service, pattern), matched against the lower-cased model id. Specific rows first.
_TABLE: list[tuple[str, str, str]] = [
    # OpenAI: models that are not text generation, and fine-tunes, come before the text rows.
    ("fine-tune", "openai", r"^ft:"),
    ("embeddings", "openai", r"^text-embedding-|^text-similarity-|^text-search-"),
    ("dall-e", "openai", r"^dall-e|^gpt-image"),
    ("audio", "openai", r"^whisper|^tts-|^gpt-4o(-mini)?-(audio|realtime|transcribe|tts)|^gpt-(audio|realtime)"),
    ("moderation", "openai", r"^omni-moderation|^text-moderation"),
    ("gpt-5-mini", "openai", r"^gpt-5(\.\d+)?-(mini|nano)"),
    ("gpt-5", "openai", r"^gpt-5"),
    ("gpt-4.1-mini", "openai", r"^gpt-4\.1-(mini|nano)"),
    ("gpt-4.1", "openai", r"^gpt-4\.1"),
    ("gpt-4.5", "openai", r"^gpt-4\.5"),
    ("gpt-4o-mini", "openai", r"^gpt-4o-mini"),
    ("gpt-4o", "openai", r"^gpt-4o|^chatgpt-4o"),
    ("gpt-4-turbo", "openai", r"^gpt-4-turbo|^gpt-4-\d{4}-(vision-)?preview|^gpt-4-vision"),
    ("gpt-4-32k", "openai", r"^gpt-4-32k"),
    ("gpt-4", "openai", r"^gpt-4"),
    ("gpt-3.5-turbo", "openai", r"^gpt-3\.5-turbo"),  # includes -instruct, billed alike
    ("o-series", "openai", r"^o\d"),
    ("gpt-oss", "openai", r"^gpt-oss"),
    ("legacy-completions", "openai", r"^(babbage|davinci|text-davinci|text-curie|text-ada|text-babbage)"),
    # Anthropic: "claude-3-5-sonnet-…", "claude-sonnet-4-…", "claude-opus-4-1-…".
    ("claude-opus", "anthropic", r"^claude-([\d.]+-)*opus"),
    ("claude-sonnet", "anthropic", r"^claude-([\d.]+-)*sonnet"),
    ("claude-haiku", "anthropic", r"^claude-([\d.]+-)*haiku"),
    ("claude", "anthropic", r"^claude"),
    # Google AI: "gemini-2.5-flash", "gemini-2.0-flash-lite", "gemini-2.5-pro-preview-06-05", "gemma-3-27b-it".
    ("imagen", "google-ai", r"^(models/)?(imagen|veo)-"),
    ("gemini-embedding", "google-ai", r"^(models/)?(gemini-embedding|embedding-)"),
    ("gemini-flash-lite", "google-ai", r"^(models/)?gemini-([\d.]+-)?flash-lite"),
    ("gemini-flash", "google-ai", r"^(models/)?gemini-([\d.]+-)?flash"),
    ("gemini-pro", "google-ai", r"^(models/)?gemini-([\d.]+-)?pro"),
    ("gemini", "google-ai", r"^(models/)?gemini"),
    ("gemma", "google-ai", r"^(models/)?gemma"),
    # OpenAI-compatible services with models of their own.
    ("deepseek-reasoner", "deepseek", r"^deepseek-(reasoner|r1)"),
    ("deepseek", "deepseek", r"^deepseek"),
    ("grok", "xai", r"^grok"),
    ("mistral-large", "mistral-ai", r"^mistral-large"),
    ("mistral", "mistral-ai", r"^(mistral|open-mistral|open-mixtral|ministral|codestral|pixtral|magistral|devstral)"),
]

FAMILIES: list[tuple[str, str, re.Pattern[str]]] = [
    (family, service, re.compile(pattern)) for family, service, pattern in _TABLE
]

# Families that are not text generation: never served unless ALLOWED_MODEL_FAMILIES names them.
NON_TEXT = frozenset({"dall-e", "audio", "moderation", "imagen"})
# Services whose models the table knows: an unknown model is "<service>-other" ("other" for OpenAI).
# Any other service (an OpenAI-compatible one) is itself the family of the models the table does not know.
FIRST_PARTY = frozenset({"openai", "anthropic", "google-ai"})


# Model names come from clients: only names this short are cached (the cache holds at most
# 8192 of them), so it cannot grow past a few MB whatever clients send.
CACHED_NAME_LENGTH = 256


def family_of(model: str, service: str = "openai") -> str:
    """The family of a model id; unknown models fall back to a per-service family."""
    if model and len(model) > CACHED_NAME_LENGTH:
        return _family_of(model, service)
    return _cached_family_of(model, service)


def _family_of(model: str, service: str) -> str:
    name = (model or "").strip().lower()
    for family, _owner, pattern in FAMILIES:
        if pattern.search(name):
            return family
    if service == "openai":
        return "other"
    return f"{service}-other" if service in FIRST_PARTY else service


_cached_family_of = lru_cache(maxsize=8192)(_family_of)


def families_of(models: Iterable[str], service: str = "openai") -> list[str]:
    """The sorted, distinct families of some models."""
    return sorted({family_of(m, service) for m in models})


def known_families() -> set[str]:
    """Every family name the table can produce (for validating ALLOWED_MODEL_FAMILIES)."""
    return {family for family, _, _ in FAMILIES} | {"other", "anthropic-other", "google-ai-other"}


def is_allowed(family: str, allowed: set[str] | frozenset[str]) -> bool:
    """With no filter, every text family is served; otherwise exactly the listed ones."""
    if allowed:
        return family in allowed
    return family not in NON_TEXT
