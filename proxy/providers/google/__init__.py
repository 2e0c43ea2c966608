"""Google AI (Gemini): native routes and an OpenAI-format door."""

from proxy.providers.google.dialect import Gemini

__all__ = ["Gemini"]
