"""Anthropic model ids as Bedrock names them, per region (pure)."""

from __future__ import annotations

import re

from proxy.providers.claude_hosted import resolve

# Models served on demand only through a cross-region inference profile (`us.anthropic.…`).
_PROFILE_ONLY = re.compile(r"^claude-(3-7-|[a-z]+-[4-9])")
_DATED = re.compile(r"-\d{8}\Z")
_BEDROCK_ID = re.compile(
    r"^(?:(?:us|eu|apac|us-gov|jp|au|ca|global)\.)?anthropic\.(claude-[A-Za-z0-9.-]+?)-v\d+(?::\d+)?\Z"
)
_VERSIONS = {"claude-3-5-sonnet-20241022": "v2:0"}


def geography(region: str) -> str | None:
    """The inference-profile prefix of a region's geography, if Bedrock has one for it."""
    if region.startswith("us-gov-"):
        return "us-gov"
    for prefix, geo in (("us-", "us"), ("eu-", "eu"), ("ap-", "apac")):
        if region.startswith(prefix):
            return geo
    return None


def bedrock_id(model: str, region: str) -> str:
    """`claude-sonnet-4-5` in us-east-1 -> `us.anthropic.claude-sonnet-4-5-20250929-v1:0`. A Bedrock
    id or profile a client names is used as given."""
    if model.startswith("anthropic.") or ".anthropic." in model:
        return model
    dated = resolve(model)
    # Dated ids carry a revision (`-v1:0`); the undated ids of newer models only a version (`-v1`).
    base = f"anthropic.{dated}-{_VERSIONS.get(dated, 'v1:0' if _DATED.search(dated) else 'v1')}"
    geo = geography(region) if _PROFILE_ONLY.match(dated) else None
    return f"{geo}.{base}" if geo else base


def anthropic_id(bedrock: str) -> str | None:
    """`us.anthropic.claude-sonnet-4-5-20250929-v1:0` -> `claude-sonnet-4-5-20250929`."""
    found = _BEDROCK_ID.match(bedrock)
    return found.group(1) if found else None
