"""The AWS Bedrock dialect: Claude through `invoke` / `invoke-with-response-stream`, SigV4-signed.

Each pool key is `access_key:secret_key:region`. Per key tried, `target` maps the client's model
to the Bedrock id (or inference profile) of the key's region, rewrites the body Bedrock's way
(`anthropic_version: bedrock-2023-05-31`, no `model`/`stream`, betas in `anthropic_beta`) and signs
the final bytes with botocore's SigV4 signer. Streams arrive as binary event-stream frames, which
`stream_decoder` turns back into Anthropic's SSE. Runtime calls go to `bedrock-runtime.<region>`,
control-plane calls (model list, logging configuration) to `bedrock.<region>`; AWS_ENDPOINT_URL
replaces both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from yarl import URL

from proxy.keys.pool import Outcome, Verdict
from proxy.providers.aws.eventstream import CONTENT_TYPE, EventStreamToSSE
from proxy.providers.aws.models import anthropic_id, bedrock_id
from proxy.providers.base import Call, Outbound, retry_after
from proxy.providers.claude_hosted import HostedClaude, hosted_body, invoke_target
from proxy.providers.cloud_credentials import AwsEntry, parse_aws

VERSION = "bedrock-2023-05-31"
RUNTIME = "https://bedrock-runtime.{region}.amazonaws.com"
CONTROL = "https://bedrock.{region}.amazonaws.com"
SIGNING_NAME = "bedrock"  # both bedrock and bedrock-runtime sign as "bedrock"
MAX_CACHED = 4096
# Errors that say the credentials themselves are not accepted.
BAD_CREDENTIALS = frozenset({
    "UnrecognizedClientException", "InvalidSignatureException", "SignatureDoesNotMatch", "InvalidClientTokenId",
    "ExpiredTokenException", "IncompleteSignatureException", "MissingAuthenticationTokenException",
})  # fmt: skip
THROTTLED = frozenset({"ThrottlingException", "ServiceQuotaExceededException", "TooManyRequestsException"})


def error_type(headers: Mapping[str, str], body: Any) -> str:
    """AWS's error name: the `x-amzn-ErrorType` header (`Name:namespace`), else the body's `__type`."""
    name = headers.get("x-amzn-errortype") or (body.get("__type") if isinstance(body, dict) else "") or ""
    return str(name).split(":", 1)[0].rsplit("#", 1)[-1]


class Bedrock(HostedClaude):
    name = "aws"
    key_prefix = "aws-"
    response_headers = frozenset({"x-amzn-requestid"})
    models_path = "/foundation-models?byProvider=Anthropic"

    def __init__(self, endpoint_url: str = "") -> None:
        # Imported once at start, and only when AWS credentials are configured.
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        self._sigv4, self._request, self._credentials = SigV4Auth, AWSRequest, Credentials
        self.endpoint_url = endpoint_url.rstrip("/")
        self._entries: dict[str, AwsEntry] = {}
        self.profiles: dict[str, dict[str, str]] = {}  # region -> {Anthropic id: inference profile}, from checks

    def entry(self, secret: str) -> AwsEntry:
        entry = self._entries.get(secret)
        if entry is None:
            entry = parse_aws(secret)[0]
            if len(self._entries) < MAX_CACHED:
                self._entries[secret] = entry
        return entry

    def auth_headers(self, secret: str) -> dict[str, str]:
        return {}  # the signature is made over the final request, in target

    def host(self, region: str, control: bool) -> str:
        return self.endpoint_url or (CONTROL if control else RUNTIME).replace("{region}", region)

    async def target(self, call: Call) -> Outbound:
        entry = self.entry(call.secret)
        headers = {"content-type": "application/json", "accept": "application/json"}
        body = call.body
        if call.path.startswith("/model/"):
            model, stream = invoke_target(call.path)
            model_id = quote(bedrock_id(model, entry.region, self.profiles.get(entry.region)), safe="")
            action = "invoke-with-response-stream" if stream else "invoke"
            url = f"{self.host(entry.region, False)}/model/{model_id}/{action}"
            body = hosted_body(body, VERSION, keep_stream=False, beta_in_body=call.client_headers.get("anthropic-beta"))
            if stream:
                headers["accept"] = CONTENT_TYPE
        else:  # the control plane: model list, logging configuration
            url = self.host(entry.region, True) + call.path
        return Outbound(URL(url, encoded=True), self.sign(entry, call.method, url, headers, body), body)

    def sign(self, entry: AwsEntry, method: str, url: str, headers: dict[str, str], body: bytes | None) -> dict:
        request = self._request(method=method, url=url, data=body or b"", headers=headers)
        credentials = self._credentials(entry.access_key, entry.secret_key)
        self._sigv4(credentials, SIGNING_NAME, entry.region).add_auth(request)
        return dict(request.headers.items())

    def streams(self, content_type: str) -> bool:
        return CONTENT_TYPE in content_type or super().streams(content_type)

    def stream_decoder(self) -> Callable[[bytes], bytes] | None:
        return EventStreamToSSE()

    def classify(self, status: int, headers: Mapping[str, str], body: Any) -> Outcome:
        """Bad credentials revoke; a model the account may not use (403 AccessDenied) or Bedrock does not
        have here (404) is that model missing on this key; throttling waits; 5xx, 408, 424 retry."""
        name = error_type(headers, body)
        if status == 401 or name in BAD_CREDENTIALS:
            return Outcome(Verdict.REVOKED)
        if status == 429 or name in THROTTLED:
            return Outcome(Verdict.RATE_LIMITED, retry_after(headers, time.time()))
        if status in (403, 404) or name in ("AccessDeniedException", "ResourceNotFoundException"):
            return Outcome(Verdict.MODEL_MISSING)
        if status >= 500 or status in (408, 409, 424):
            return Outcome(Verdict.RETRYABLE)
        return Outcome(Verdict.CLIENT_ERROR)

    def model_ids(self, body: Any) -> set[str]:
        """Anthropic ids of the Claude models in a ListFoundationModels reply."""
        items = body.get("modelSummaries") if isinstance(body, dict) else None
        out: set[str] = set()
        for item in items or ():
            model = anthropic_id(str(item.get("modelId") or "")) if isinstance(item, dict) else None
            if model:
                out.add(model)
        return out
