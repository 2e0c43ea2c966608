"""OpenAI: the dialect (Chat Completions, Responses, embeddings...), its key check and reasoning-model fixes."""

from proxy.providers.openai.dialect import OpenAI

__all__ = ["OpenAI"]
