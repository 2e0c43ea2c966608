"""The Azure OpenAI dialect: OpenAI's API under /proxy/azure/openai/v1/, sent to a deployment.

Each pool key is one deployment (`resource:deployment:key`). The key check learns which model a
deployment serves (the `model` of its reply), so the pool picks, for the model a client names, a
deployment that serves it. The request goes to `<endpoint>/openai/deployments/<deployment>/<path>
?api-version=<AZURE_API_VERSION>` with the key in `api-key`. Content-filter refusals are rendered
as a readable OpenAI error naming the categories that tripped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Call, Endpoint, Outbound
from proxy.providers.cloud_credentials import AzureEntry, parse_azure
from proxy.providers.openai.dialect import OpenAI

MAX_CACHED = 4096


class Azure(OpenAI):
    name = "azure"
    key_prefix = "az-"
    route_prefix = "openai"
    endpoints = (
        Endpoint("GET", ("openai", "v1", "models"), None, "models", "openai"),
        Endpoint("GET", ("openai", "v1", "models", "*"), None, "model", "openai"),
        Endpoint("POST", ("openai", "v1", "chat", "completions"), "/chat/completions", "chat", "openai"),
        Endpoint("POST", ("openai", "v1", "embeddings"), "/embeddings", "embeddings", "openai"),
    )
    response_headers = frozenset({"x-request-id", "apim-request-id"})
    models_path = "/models"  # the resource's model catalogue, asked only before any deployment is checked

    def __init__(self, endpoint_template: str, api_version: str) -> None:
        super().__init__()
        self.endpoint_template = endpoint_template
        self.api_version = api_version
        self._entries: dict[str, AzureEntry] = {}

    def entry(self, secret: str) -> AzureEntry:
        entry = self._entries.get(secret)
        if entry is None:
            entry = parse_azure(secret)[0]
            if len(self._entries) < MAX_CACHED:
                self._entries[secret] = entry
        return entry

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {"api-key": self.entry(secret).key}

    async def target(self, call: Call) -> Outbound:
        entry = self.entry(call.secret)
        root = self.endpoint_template.replace("{resource}", entry.resource).rstrip("/") + "/openai"
        path, _, query = call.path.partition("?")
        query = f"api-version={self.api_version}" + (f"&{query}" if query else "")
        if path == self.models_path:
            url = f"{root}/models?{query}"
        else:
            url = f"{root}/deployments/{entry.deployment}{path}?{query}"
        return Outbound(url, self.outbound_headers(call.client_headers, call.secret), call.body)

    def error_shape(self, rest: tuple[str, ...]) -> str:
        return "openai"

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """OpenAI's reading, plus Azure's own: a deployment that no longer exists is a dead entry."""
        code = _code(body)
        if status == 404 and code == "DeploymentNotFound":
            return Outcome(Verdict.REVOKED)
        if status == 403 and code in ("AuthenticationTypeDisabled", "PermissionDenied"):
            return Outcome(Verdict.REVOKED)
        return super().classify(status, headers, body)

    def client_error(self, shape: str, status: int, body: Any) -> Any:
        return readable_content_filter(body)


def _code(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def filtered_categories(result: Any) -> list[str]:
    """`hate (high)`, `jailbreak` ... for every category of a content_filter_result that tripped."""
    out: list[str] = []
    if not isinstance(result, dict):
        return out
    for name, verdict in result.items():
        if isinstance(verdict, dict) and (verdict.get("filtered") or verdict.get("detected") and name == "jailbreak"):
            severity = verdict.get("severity")
            out.append(f"{name} ({severity})" if isinstance(severity, str) and severity != "safe" else str(name))
    return out


def readable_content_filter(body: Any) -> Any:
    """Azure's content-filter refusal with a message that says what happened and which categories
    tripped; the body keeps OpenAI's shape (`error.message`, `type`, `code: content_filter`)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or error.get("code") != "content_filter":
        return body
    inner = error.get("innererror") if isinstance(error.get("innererror"), dict) else {}
    categories = filtered_categories(inner.get("content_filter_result"))
    reason = f" (flagged: {', '.join(categories)})" if categories else ""
    original = str(error.get("message") or "").strip()
    message = f"Azure OpenAI's content filter refused this request{reason}."
    if original:
        message += f" Azure said: {original}"
    return {**body, "error": {**error, "message": message, "type": error.get("type") or "invalid_request_error"}}
