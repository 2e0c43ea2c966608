"""Fake clouds on loopback: Azure OpenAI deployments, AWS Bedrock (SigV4 verified, event-stream
frames) and Google Vertex AI with a fake OAuth token endpoint.

Each reuses the OpenAI or Anthropic fake for what the model says (so usage is what those fakes
count) and adds the cloud's own addressing, authentication, body rules and errors, as documented:
- Azure: `/<resource>/openai/deployments/<deployment>/{chat/completions,embeddings}?api-version=`
  with `api-key` (the resource sits in the path: AZURE_ENDPOINT_TEMPLATE=http://127.0.0.1:N/{resource}).
- Bedrock: `POST /model/<percent-encoded model id>/invoke[-with-response-stream]`; the SigV4
  signature is recomputed here with botocore over what arrived; streams are AWS event-stream frames
  (`chunk` events with base64 Anthropic events; exception frames), written split across writes.
- Vertex: `/v1/projects/<p>/locations/<r>/publishers/anthropic/models/<m@date>:{raw,streamRaw}Predict`
  with a Bearer token minted at `POST /token` from a JWT the service account's key signed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json as jsonlib
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote

from aiohttp import web

from tests.fakes import FakeAnthropic, FakeOpenAI, Json, KeyBehaviour, StreamEvent, _parse_json, anthropic_error


# --------------------------------------------------------------------------------------------
# Azure OpenAI
# --------------------------------------------------------------------------------------------
class FakeAzure(FakeOpenAI):
    """`deployments[(resource, deployment)] = model`; `resource_keys[resource] = {key: KeyBehaviour}`."""

    API_VERSION = "2024-10-21"
    FILTER_WORD = "forbidden-topic"
    EMBEDDING = re.compile(r"^text-embedding")
    _PATH = re.compile(r"^/(?P<res>[^/]+)/openai/deployments/(?P<dep>[^/]+)/(?P<op>chat/completions|embeddings)\Z")

    def __init__(self, deployments: dict[tuple[str, str], str], resource_keys: dict[str, dict[str, KeyBehaviour]]):
        super().__init__({k: b for keys in resource_keys.values() for k, b in keys.items()})
        self.deployments = deployments
        self.resource_keys = resource_keys

    def _key_of(self, headers: dict[str, str]) -> str | None:
        return headers.get("api-key")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        found = self._PATH.match(request.path)
        if request.query.get("api-version") != self.API_VERSION or found is None or request.method != "POST":
            return self._json({"error": {"code": "404", "message": "Resource not found"}}, 404)
        resource, deployment, op = found.group("res"), found.group("dep"), found.group("op")
        key = request.headers.get("api-key", "")
        behaviour = self.resource_keys.get(resource, {}).get(key)
        if behaviour is None or behaviour.kind == "revoked":
            message = f"Access denied due to invalid subscription key {key} or wrong API endpoint."
            return self._json({"error": {"code": "401", "message": message}}, 401)
        model = self.deployments.get((resource, deployment))
        if model is None:
            message = "The API deployment for this resource does not exist."
            return self._json({"error": {"code": "DeploymentNotFound", "message": message}}, 404)
        body = _parse_json(await request.read())
        if not isinstance(body, dict):
            return self._json({"error": {"code": "BadRequest", "message": "invalid JSON"}}, 400)
        is_embedding = bool(self.EMBEDDING.match(model))
        if (op == "embeddings") != is_embedding:
            message = f"The {'embeddings' if op == 'embeddings' else 'chatCompletion'} operation does not work "
            message += "with the specified model, {model}. Please choose different model and try again."
            return self._json({"error": {"code": "OperationNotSupported", "message": message}}, 400)
        if self.FILTER_WORD in jsonlib.dumps(body.get("messages") or ""):
            return self._json(self.content_filter_error(), 400)
        refusal = self._refuse(key, behaviour, body)
        if refusal is not None:
            return refusal
        body["model"] = model  # Azure answers with the deployment's model, whatever the body says
        if is_embedding:
            return self._embeddings(body, behaviour)
        return await self._chat(request, body, behaviour)

    @staticmethod
    def content_filter_error() -> Json:
        result = {
            "hate": {"filtered": False, "severity": "safe"},
            "self_harm": {"filtered": False, "severity": "safe"},
            "sexual": {"filtered": False, "severity": "safe"},
            "violence": {"filtered": True, "severity": "medium"},
        }
        return {
            "error": {
                "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
                "policy. Please modify your prompt and retry.",
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result},
            }
        }


# --------------------------------------------------------------------------------------------
# AWS Bedrock
# --------------------------------------------------------------------------------------------
def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths + CRC), string headers, payload, CRC."""
    encoded = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def chunk_frame(event: Json) -> bytes:
    payload = jsonlib.dumps({"bytes": base64.b64encode(jsonlib.dumps(event).encode()).decode()}).encode()
    return event_frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def exception_frame(name: str, message: str) -> bytes:
    headers = {":exception-type": name, ":content-type": "application/json", ":message-type": "exception"}
    return event_frame(headers, jsonlib.dumps({"message": message}).encode())


@dataclass
class AwsAccount:
    secret_key: str
    region: str
    behaviour: KeyBehaviour = field(default_factory=KeyBehaviour)
    enabled: tuple[str, ...] = ("claude-3-5-haiku-20241022", "claude-sonnet-4-5-20250929")
    logging: Json | None = None  # GetModelInvocationLoggingConfiguration's loggingConfig
    logging_denied: bool = False
    profiles: tuple[str, ...] | None = None  # the system inference profiles listed in the region (None: by geography)


class FakeBedrock(FakeAnthropic):
    """Bedrock runtime and control plane on one port; `accounts[access_key] = AwsAccount`."""

    PROFILE_ONLY = re.compile(r"^claude-(3-7-|(opus|sonnet|haiku)-4)")
    _ID = re.compile(r"^(?:(us|eu|apac|jp|au|global)\.)?anthropic\.(claude-[a-z0-9.-]+?)-v\d(:\d)?\Z")
    _AUTH = re.compile(
        r"^AWS4-HMAC-SHA256 Credential=(?P<ak>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
        r"\s*SignedHeaders=(?P<signed>[a-z0-9;-]+),\s*Signature=(?P<sig>[0-9a-f]{64})\Z"
    )

    def __init__(self, accounts: dict[str, AwsAccount]) -> None:
        super().__init__({ak: a.behaviour for ak, a in accounts.items()})
        self.accounts = accounts
        self.bad_signatures = 0
        self.exception_mid_stream: str | None = None  # e.g. "throttlingException": sent after 2 content frames
        self.invocation_metrics = True

    def _key_of(self, headers: dict[str, str]) -> str | None:
        found = self._AUTH.match(headers.get("authorization", ""))
        return found.group("ak") if found else None

    def _error(self, status: int, name: str, message: str) -> web.Response:
        return self._json({"message": message}, status, {"x-amzn-ErrorType": f"{name}:http://internal.amazon.com/"})

    def verify(self, request: web.Request, body: bytes) -> tuple[str | None, web.Response | None]:
        """The access key of a correctly signed request, or the error AWS would give."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        found = self._AUTH.match(request.headers.get("authorization", ""))
        if found is None:
            return None, self._error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        access_key = found.group("ak")
        account = self.accounts.get(access_key)
        if account is None or account.behaviour.kind == "revoked":
            message = f"The security token included in the request is invalid. (key {access_key})"
            return None, self._error(403, "UnrecognizedClientException", message)
        signed = found.group("signed").split(";")
        headers = {name: request.headers.get(name, "") for name in signed}
        aws = AWSRequest(method=request.method, url=self.url + request.raw_path, data=body, headers=headers)
        aws.context["timestamp"] = headers.get("x-amz-date", "")
        signer = SigV4Auth(Credentials(access_key, account.secret_key), found.group("service"), found.group("region"))
        expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
        scope_ok = found.group("region") == account.region and found.group("service") == "bedrock"
        if not (scope_ok and hmac.compare_digest(expected, found.group("sig"))):
            self.bad_signatures += 1
            message = "The request signature we calculated does not match the signature you provided."
            return None, self._error(403, "InvalidSignatureException", message)
        return access_key, None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        access_key, refusal = self.verify(request, raw)
        if refusal is not None:
            return refusal
        account = self.accounts[access_key]
        path = request.raw_path.split("?", 1)[0]
        if request.method == "GET" and path == "/logging/modelinvocations":
            if account.logging_denied:
                return self._error(403, "AccessDeniedException", "not authorized to perform this action")
            return self._json({"loggingConfig": account.logging} if account.logging else {})
        if request.method == "GET" and path == "/inference-profiles":
            if account.profiles is None:
                return self._error(403, "AccessDeniedException", "not authorized to perform this action")
            return self._json({"inferenceProfileSummaries": [{"inferenceProfileId": p} for p in account.profiles]})
        if request.method == "GET" and path == "/foundation-models":
            models = [{"modelId": f"anthropic.{m}-v1:0", "providerName": "Anthropic"} for m in account.enabled]
            return self._json({"modelSummaries": models})
        found = re.match(r"^/model/([^/]+)/(invoke|invoke-with-response-stream)\Z", path)
        if request.method != "POST" or found is None:
            return self._error(404, "UnknownOperationException", "Unknown operation")
        if ":" in found.group(1):
            return self._error(400, "ValidationException", "model id must be percent-encoded, as the AWS SDKs send it")
        model_id = unquote(found.group(1))
        parsed = self._ID.match(model_id)
        if parsed is None:
            return self._error(400, "ValidationException", "The provided model identifier is invalid.")
        geo, model = parsed.group(1), parsed.group(2)
        if self.PROFILE_ONLY.match(model) and geo is None:
            message = f"Invocation of model ID anthropic.{model} with on-demand throughput isn't supported. "
            message += "Retry your request with the ID or ARN of an inference profile that contains this model."
            return self._error(400, "ValidationException", message)
        if geo is not None and account.profiles is not None and model_id not in account.profiles:
            return self._error(400, "ValidationException", "The provided model identifier is invalid.")
        geo_region = {"us": "us-", "eu": "eu-", "apac": "ap-", "jp": "ap-northeast-1", "au": "ap-southeast-2"}
        if geo not in (None, "global") and not account.region.startswith(geo_region[geo]):
            return self._error(400, "ValidationException", "The provided model identifier is invalid.")
        if model not in account.enabled:
            message = "You don't have access to the model with the specified model ID."
            return self._error(403, "AccessDeniedException", message)
        body = _parse_json(raw)
        if not isinstance(body, dict) or body.get("anthropic_version") != "bedrock-2023-05-31":
            return self._error(400, "ValidationException", "Malformed input request: anthropic_version required")
        for extraneous in ("model", "stream"):
            if extraneous in body:
                return self._error(400, "ValidationException", f"extraneous key [{extraneous}] is not permitted")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1 or not body.get("messages"):
            return self._error(400, "ValidationException", "Malformed input request: max_tokens must be >= 1")
        if account.behaviour.rate_limited:
            return self._error(429, "ThrottlingException", "Too many requests, please wait before trying again.")
        body["model"] = model
        body["stream"] = found.group(2) != "invoke"
        return await self._message(request, body, account.behaviour, self._input_tokens(body))

    async def _stream(self, request: web.Request, events: Any, headers: dict[str, str]) -> web.StreamResponse:
        """The Anthropic events as event-stream frames, each written in two pieces."""
        response = web.StreamResponse(
            status=200,
            headers={**headers, "Content-Type": "application/vnd.amazon.eventstream", "x-amzn-RequestId": "req-aws-1"},
        )
        await response.prepare(request)
        content = 0
        for event in events:
            data = next(line for line in event.data.decode().split("\n") if line.startswith("data: "))[6:]
            payload = jsonlib.loads(data)
            if payload.get("type") == "message_stop" and self.invocation_metrics:
                payload["amazon-bedrock-invocationMetrics"] = {"inputTokenCount": 1, "outputTokenCount": 1}
            frame = chunk_frame(payload)
            half = len(frame) // 2
            await response.write(frame[:half])
            await asyncio.sleep(0)
            await response.write(frame[half:])
            content += event.content
            if self.exception_mid_stream and content == 2:
                await response.write(exception_frame(self.exception_mid_stream, "Too many tokens, please wait."))
                break
        await response.write_eof()
        return response


# --------------------------------------------------------------------------------------------
# Google Vertex AI
# --------------------------------------------------------------------------------------------
@dataclass
class GcpAccount:
    public_key_pem: str
    project: str
    behaviour: KeyBehaviour = field(default_factory=KeyBehaviour)
    enabled: tuple[str, ...] = ("claude-3-5-haiku-20241022", "claude-sonnet-4-5-20250929")
    regions: tuple[str, ...] = ("us-east5",)


class FakeVertex(FakeAnthropic):
    """Vertex and its token endpoint; `accounts[client_email] = GcpAccount`."""

    TOKEN_PATH = "/token"
    _PATH = re.compile(
        r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<region>[^/]+)/publishers/anthropic/models/"
        r"(?P<model>[^/:]+):(?P<action>rawPredict|streamRawPredict)\Z"
    )
    DEFAULT_MODELS: ClassVar[list[str]] = []

    def __init__(self, accounts: dict[str, GcpAccount]) -> None:
        super().__init__({})
        self.accounts = accounts
        self.tokens: dict[str, tuple[str, float]] = {}  # token -> (client email, expiry)
        self.minted = 0
        self.token_lifetime = 3600
        self.echo_token = False  # answer every prediction with an error that quotes the bearer token

    @property
    def token_url(self) -> str:
        return self.url + self.TOKEN_PATH

    def _key_of(self, headers: dict[str, str]) -> str | None:
        auth = headers.get("authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    @staticmethod
    def _google(status: int, code: str, message: str) -> Json:
        return {"error": {"code": status, "message": message, "status": code}}

    def _mint(self, form: dict[str, list[str]]) -> web.Response:
        from google.auth import jwt

        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"] or not form.get("assertion"):
            return self._json({"error": "unsupported_grant_type"}, 400)
        assertion = form["assertion"][0]
        try:
            claims = jwt.decode(assertion, verify=False)
            account = self.accounts.get(str(claims.get("iss")))
            if account is None or account.behaviour.kind == "revoked":
                return self._json({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, 400)
            claims = jwt.decode(assertion, certs=account.public_key_pem, audience=self.token_url)
        except ValueError:
            return self._json({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, 400)
        if claims.get("scope") != "https://www.googleapis.com/auth/cloud-platform":
            return self._json({"error": "invalid_scope"}, 400)
        self.minted += 1
        # Real ones are ~150 characters of base64url after "ya29."
        token = f"ya29.fake-token-{self.minted}-{claims['iss'].split('@')[0]}-{secrets.token_urlsafe(48)}"
        self.tokens[token] = (str(claims["iss"]), time.time() + self.token_lifetime)
        return self._json({"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if request.method == "POST" and request.path == self.TOKEN_PATH:
            return self._mint(parse_qs(raw.decode()))
        token = self._key_of({k.lower(): v for k, v in request.headers.items()}) or ""
        owner = self.tokens.get(token)
        if owner is None or owner[1] < time.time():
            message = "Request had invalid authentication credentials. Expected OAuth 2 access token."
            return self._json(self._google(401, "UNAUTHENTICATED", message), 401)
        email = owner[0]
        account = self.accounts[email]
        if request.method == "GET" and request.path == "/v1beta1/publishers/anthropic/models":
            names = [f"publishers/anthropic/models/{m}" for m in account.enabled]
            return self._json({"publisherModels": [{"name": n} for n in names]})
        found = self._PATH.match(request.path)
        if request.method != "POST" or found is None:
            return self._json(self._google(404, "NOT_FOUND", "The requested URL was not found."), 404)
        if found.group("project") != account.project:
            message = f"Permission 'aiplatform.endpoints.predict' denied on resource '{found.group('project')}'."
            return self._json(self._google(403, "PERMISSION_DENIED", message), 403)
        vertex_model = found.group("model")
        model = vertex_model.replace("@", "-")
        dated_without_at = re.search(r"-\d{8}\Z", vertex_model) is not None  # Vertex writes claude-x@20250929
        if dated_without_at or model not in account.enabled or found.group("region") not in account.regions:
            message = f"Publisher Model `projects/{account.project}/locations/{found.group('region')}/publishers/"
            message += f"anthropic/models/{vertex_model}` not found."
            return self._json(self._google(404, "NOT_FOUND", message), 404)
        if self.echo_token:  # as upstreams that quote the credential they were sent
            return self._json(self._google(400, "INVALID_ARGUMENT", f"Bad request with credential {token}."), 400)
        body = _parse_json(raw)
        if not isinstance(body, dict) or body.get("anthropic_version") != "vertex-2023-10-16" or "model" in body:
            return self._json(anthropic_error("invalid_request_error", "anthropic_version: vertex-2023-10-16"), 400)
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1 or not body.get("messages"):
            return self._json(anthropic_error("invalid_request_error", "max_tokens: must be at least 1"), 400)
        if bool(body.get("stream")) != (found.group("action") == "streamRawPredict"):
            return self._json(anthropic_error("invalid_request_error", "stream must match the method"), 400)
        if account.behaviour.rate_limited:
            message = "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model."
            return self._json(self._google(429, "RESOURCE_EXHAUSTED", message), 429)
        body["model"] = model
        return await self._message(request, body, account.behaviour, self._input_tokens(body))


def service_account(email: str, project: str, **extra: Any) -> tuple[dict, str]:
    """A throwaway service account (its JSON) and the public key PEM the fake verifies with."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "kid" + binascii.hexlify(email.encode()[:8]).decode(),
        "private_key": private,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": "https://oauth2.googleapis.com/token",
        **extra,
    }
    return info, public


__all__ = ["AwsAccount", "FakeAzure", "FakeBedrock", "FakeVertex", "GcpAccount", "StreamEvent", "service_account"]
