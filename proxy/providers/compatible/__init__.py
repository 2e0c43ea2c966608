"""Any OpenAI-compatible service: one dialect, many named instances (DeepSeek, xAI, a local vLLM...)."""

from proxy.providers.compatible.dialect import Compatible

__all__ = ["Compatible"]
