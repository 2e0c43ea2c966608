"""An OpenAI-compatible service under its own name: the OpenAI dialect, with the differences such
services show. Each instance is one service: its route `/proxy/<name>/v1/...`, its key ids
(`<name>-` + 8 hex), its model families (`<name>` for models the family table does not know)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Endpoint, error_message
from proxy.providers.openai.dialect import OpenAI


class Compatible(OpenAI):
    """OpenAI's routes and shapes; keys optional (a local server may need none)."""

    # OpenAI's route set without /responses, which few of these services have.
    endpoints = tuple(e for e in OpenAI.endpoints if e.kind != "responses")
    response_headers = frozenset({"x-request-id"})

    def __init__(self, name: str, *, stream_usage_option: bool = True) -> None:
        super().__init__()
        self.name = name
        self.key_prefix = f"{name}-"
        # Ask for usage in streams with `stream_options`; off for a service that refuses unknown fields.
        self.stream_usage_option = stream_usage_option

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"} if secret else {}  # "" is a keyless local server

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """OpenAI's reading, plus what these services say about money: DeepSeek's and OpenRouter's
        402 (insufficient balance or credits) and xAI's 403 (no credits) mean the key is out of quota."""
        if status == 402:
            return Outcome(Verdict.OVER_QUOTA)
        if status == 403 and "credit" in error_message(body).lower():
            return Outcome(Verdict.OVER_QUOTA)
        return super().classify(status, headers, body)

    def prepare(self, endpoint: Endpoint, payload: dict) -> dict:
        if not self.stream_usage_option:
            return {"client_wants_usage": True}  # whatever usage the service sends goes to the client
        return super().prepare(endpoint, payload)

    def model_list(self, models: Iterable[str]) -> dict:
        listed = super().model_list(models)
        for item in listed["data"]:
            item["owned_by"] = self.name
        return listed
