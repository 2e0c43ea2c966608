"""Anthropic model ids as Bedrock names them, per region (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

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


def bedrock_id(model: str, region: str, profiles: Mapping[str, str] | None = None) -> str:
    """`claude-sonnet-4-5` in us-east-1 -> `us.anthropic.claude-sonnet-4-5-20250929-v1:0`: the inference
    profile the key check found for the region (`profiles`), else the rule for its geography. A
    Bedrock id or profile a client names is used as given."""
    if model.startswith("anthropic.") or ".anthropic." in model:
        return model
    dated = resolve(model)
    if profiles and dated in profiles:
        return profiles[dated]
    # Dated ids carry a revision (`-v1:0`); the undated ids of newer models only a version (`-v1`).
    base = f"anthropic.{dated}-{_VERSIONS.get(dated, 'v1:0' if _DATED.search(dated) else 'v1')}"
    geo = geography(region) if _PROFILE_ONLY.match(dated) else None
    return f"{geo}.{base}" if geo else base


def learned_profiles(profile_ids: Iterable[str], region: str) -> dict[str, str]:
    """Anthropic id -> the system inference profile to call it through from `region`, out of the
    profiles Bedrock lists there (all callable from it): its geography's first (`us.`), then a
    narrower one (`jp.`, `au.`), then `global.`."""
    geo = geography(region)
    best: dict[str, tuple[int, str]] = {}
    for profile in profile_ids:
        model = anthropic_id(profile)
        prefix = profile.split(".", 1)[0]
        if model is None or prefix == "anthropic":
            continue
        rank = 0 if prefix == geo else 2 if prefix == "global" else 1
        if model not in best or rank < best[model][0]:
            best[model] = (rank, profile)
    return {model: profile for model, (_, profile) in best.items()}


def anthropic_id(bedrock: str) -> str | None:
    """`us.anthropic.claude-sonnet-4-5-20250929-v1:0` -> `claude-sonnet-4-5-20250929`."""
    found = _BEDROCK_ID.match(bedrock)
    return found.group(1) if found else None
