"""Pure OpenAI <-> Anthropic translation: request, response, stream and error shapes.

The OpenAI-format door to Claude (``/proxy/anthropic/v1/chat/completions``) uses
:func:`openai_to_anthropic_request` on the way in and, on the way out,
:func:`anthropic_to_openai_response`, :class:`AnthropicToOpenAIStream` or
:func:`anthropic_error_to_openai`. Nothing here does I/O.
"""

from proxy.providers.anthropic.translate.request import TranslationError, openai_to_anthropic_request
from proxy.providers.anthropic.translate.response import (
    anthropic_error_to_openai,
    anthropic_to_openai_response,
)
from proxy.providers.anthropic.translate.stream import AnthropicToOpenAIStream, UpstreamStreamError

__all__ = [
    "AnthropicToOpenAIStream",
    "TranslationError",
    "UpstreamStreamError",
    "anthropic_error_to_openai",
    "anthropic_to_openai_response",
    "openai_to_anthropic_request",
]
