"""The Vertex AI dialect: Claude through `:rawPredict` / `:streamRawPredict` with a minted token.

Each pool key is one service account (its JSON). Per key tried, `target` gets the account's cached
OAuth token (minted from its private key when missing or near expiry), addresses
`<GCP_VERTEX_BASE_URL>/v1/projects/<project>/locations/<region>/publishers/anthropic/models/<model>`
(the model as Vertex names it: `claude-sonnet-4-5@20250929`) and rewrites the body Vertex's way
(`anthropic_version: vertex-2023-10-16`, no `model`). Vertex streams Anthropic's SSE as is.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from proxy.keys.pool import Outcome, Verdict
from proxy.providers.base import Call, Outbound, retry_after
from proxy.providers.claude_hosted import HostedClaude, hosted_body, invoke_target, resolve
from proxy.providers.cloud_credentials import GcpEntry, parse_gcp
from proxy.providers.gcp.token import TokenCache

VERSION = "vertex-2023-10-16"
DEFAULT_BASE = "https://{region}-aiplatform.googleapis.com"
GLOBAL_BASE = "https://aiplatform.googleapis.com"
MAX_CACHED = 1024
_DATED = re.compile(r"^(claude-.*)-(\d{8})\Z")
# Google's reasons that say the account cannot call Vertex at all.
REVOKED_REASONS = ("SERVICE_DISABLED", "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "IAM_PERMISSION_DENIED", "CONSUMER_INVALID")


def vertex_id(model: str) -> str:
    """`claude-sonnet-4-5` or `claude-sonnet-4-5-20250929` -> `claude-sonnet-4-5@20250929`."""
    if "@" in model:
        return model
    dated = _DATED.match(resolve(model))
    return f"{dated.group(1)}@{dated.group(2)}" if dated else model


class Vertex(HostedClaude):
    name = "gcp"
    key_prefix = "gcp-"
    response_headers = frozenset({"x-request-id"})
    models_path = "/v1beta1/publishers/anthropic/models"

    def __init__(self, base_url: str, token_url: str, default_region: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.default_region = default_region
        self.tokens = TokenCache(token_url)
        self._entries: dict[str, GcpEntry] = {}

    def entry(self, secret: str) -> GcpEntry:
        entry = self._entries.get(secret)
        if entry is None:
            entry = parse_gcp(secret)[0]
            if len(self._entries) < MAX_CACHED:
                self._entries[secret] = entry
        return entry

    def region(self, entry: GcpEntry) -> str:
        return entry.region or self.default_region

    def host(self, region: str) -> str:
        if region == "global" and self.base_url == DEFAULT_BASE:
            return GLOBAL_BASE
        return self.base_url.replace("{region}", region)

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {}  # a minted token, in target

    async def target(self, call: Call) -> Outbound:
        entry = self.entry(call.secret)
        region = self.region(entry)
        token = await self.tokens.token(entry)
        headers = self.outbound_headers(call.client_headers, call.secret)
        headers.pop("anthropic-version", None)  # Vertex takes the version in the body
        headers["authorization"] = f"Bearer {token}"
        body = call.body
        if call.path.startswith("/model/"):
            model, stream = invoke_target(call.path)
            action = "streamRawPredict" if stream else "rawPredict"
            url = (
                f"{self.host(region)}/v1/projects/{quote(entry.project, safe='')}/locations/{region}"
                f"/publishers/anthropic/models/{quote(vertex_id(model), safe='@')}:{action}"
            )
            body = hosted_body(body, VERSION, keep_stream=True)
        else:
            url = self.host(region) + call.path
        return Outbound(url, headers, body)

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """Anthropic's own errors (a 400 about the request, 429, 529) read as Anthropic's; Google's:
        401 is a stale token (minted again), 403 without access to Vertex revokes, 404 is a model not
        enabled for the project or region, 429 RESOURCE_EXHAUSTED waits."""
        if isinstance(body, dict) and body.get("type") == "error":
            return super().classify(status, headers, body)
        error = body[0] if isinstance(body, list) and body else body
        error = error.get("error") if isinstance(error, dict) else None
        error = error if isinstance(error, dict) else {}
        text = str(error).upper()
        if status == 401:
            self.tokens.forget()
            return Outcome(Verdict.RETRYABLE)
        if status == 403:
            revoked = any(reason in text for reason in REVOKED_REASONS) or "AIPLATFORM.ENDPOINTS.PREDICT" in text
            return Outcome(Verdict.REVOKED if revoked else Verdict.MODEL_MISSING)
        if status == 404:
            return Outcome(Verdict.MODEL_MISSING)
        if status == 429:
            return Outcome(Verdict.RATE_LIMITED, retry_after(headers, time.time()))
        if status >= 500 or status in (408, 409):
            return Outcome(Verdict.RETRYABLE)
        return Outcome(Verdict.CLIENT_ERROR)

    def model_ids(self, body: Any) -> set[str]:
        items = body.get("publisherModels") if isinstance(body, dict) else None
        return {str(m["name"]).rsplit("/", 1)[-1] for m in items or () if isinstance(m, dict) and m.get("name")}
