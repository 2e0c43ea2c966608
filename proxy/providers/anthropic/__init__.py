"""Anthropic: the Messages API dialect, its key check, and the OpenAI-format door translated to it."""

from proxy.providers.anthropic.dialect import Anthropic

__all__ = ["Anthropic"]
