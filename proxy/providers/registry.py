"""Settings -> the services the pipeline serves. Adding a provider: one folder under
`proxy/providers/`, and one line in PROVIDERS naming the function that reads its settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from proxy.config import Settings, key_variable, split_keys
from proxy.keys.checker import CheckFn
from proxy.providers.anthropic.dialect import Anthropic
from proxy.providers.base import Dialect
from proxy.providers.compatible import Compatible
from proxy.providers.compatible import check as compatible_check
from proxy.providers.google import Gemini
from proxy.providers.google import check as google_check
from proxy.providers.openai.dialect import OpenAI

if TYPE_CHECKING:
    from collections.abc import Iterator

KEYLESS = ""  # the one "key" of a custom upstream without keys: no credential is sent


@dataclass(frozen=True)
class ServiceSpec:
    """One service to serve at /proxy/<name>/: its dialect, base URL, keys and key check."""

    name: str
    dialect: Dialect
    base_url: str
    keys: list[str] = field(repr=False)
    key_env: str
    check: CheckFn | None = None  # None: the checker's own for the dialect (OpenAI, Anthropic)


def first_party(settings: Settings) -> Iterator[ServiceSpec]:
    openai = OpenAI(allow_stored_responses=settings.openai_responses_store)
    yield ServiceSpec("openai", openai, settings.openai_base_url, settings.openai_keys, "OPENAI_KEY")
    if settings.anthropic_keys:  # Claude routes exist only when a Claude key is configured
        keys = settings.anthropic_keys
        yield ServiceSpec("anthropic", Anthropic(), settings.anthropic_base_url, keys, "ANTHROPIC_KEY")


def google_ai(settings: Settings) -> Iterator[ServiceSpec]:
    keys = split_keys(settings.google_ai_key)
    if keys:
        yield ServiceSpec("google-ai", Gemini(), settings.google_ai_base_url, keys, "GOOGLE_AI_KEY", google_check.check)


# Built-in OpenAI-compatible services: (route name, settings prefix, asks for stream usage).
BUILT_IN_COMPATIBLE = (
    ("deepseek", "deepseek", True),
    ("xai", "xai", True),
    ("mistral-ai", "mistral_ai", False),  # Mistral refuses unknown fields; it sends stream usage unasked
    ("openrouter", "openrouter", True),
    ("groq", "groq", True),
)


def compatible(settings: Settings) -> Iterator[ServiceSpec]:
    for name, prefix, stream_usage in BUILT_IN_COMPATIBLE:
        keys = split_keys(getattr(settings, f"{prefix}_key"))
        if keys:
            dialect = Compatible(name, stream_usage_option=stream_usage)
            base_url = getattr(settings, f"{prefix}_base_url")
            yield ServiceSpec(name, dialect, base_url, keys, f"{prefix.upper()}_KEY", compatible_check.check)
    for name, base_url in settings.custom_upstream_list:
        keys = split_keys(settings.custom_keys.get(name, "")) or [KEYLESS]
        yield ServiceSpec(name, Compatible(name), base_url, keys, key_variable(name), compatible_check.check)


def clouds(settings: Settings) -> Iterator[ServiceSpec]:
    """Azure OpenAI, AWS Bedrock (Claude), Google Vertex AI (Claude): each when its credentials are set.
    Their SDKs (botocore, google-auth) are imported here, only then."""
    from proxy.providers.cloud_credentials import parse_aws, parse_azure, parse_gcp

    if azure := parse_azure(settings.azure_credentials):
        from proxy.providers.azure import Azure
        from proxy.providers.azure import check as azure_check

        dialect = Azure(settings.azure_endpoint_template, settings.azure_api_version)
        keys = [e.secret for e in azure]
        base_url = settings.azure_endpoint_template
        yield ServiceSpec("azure", dialect, base_url, keys, "AZURE_CREDENTIALS", azure_check.check)
    if aws := parse_aws(settings.aws_credentials):
        from proxy.providers.aws import Bedrock
        from proxy.providers.aws import check as aws_check

        check = partial(aws_check.check, allow_logging=settings.allow_aws_logging)
        base_url = settings.aws_endpoint_url or "https://bedrock-runtime.{region}.amazonaws.com"
        yield ServiceSpec("aws", Bedrock(settings.aws_endpoint_url), base_url, [e.secret for e in aws],
                          "AWS_CREDENTIALS", check)  # fmt: skip
    if gcp := parse_gcp(settings.gcp_credentials):
        from proxy.providers.gcp import Vertex
        from proxy.providers.gcp import check as gcp_check

        dialect = Vertex(settings.gcp_vertex_base_url, settings.gcp_token_url, settings.gcp_region)
        keys = [e.secret for e in gcp]
        yield ServiceSpec("gcp", dialect, settings.gcp_vertex_base_url, keys, "GCP_CREDENTIALS", gcp_check.check)


PROVIDERS: tuple[Callable[[Settings], Iterator[ServiceSpec]], ...] = (
    first_party,
    google_ai,
    compatible,
    clouds,
)


def services_from(settings: Settings) -> list[ServiceSpec]:
    """Every configured service, in the order the page shows them."""
    return [spec for provider in PROVIDERS for spec in provider(settings)]
