"""Checking a key of an OpenAI-compatible service: `GET /models`, free everywhere.

200 lists the models (the key is alive); 401 or 403 revoke it (a 403 saying "credit" means no
credits: over quota); 402 means out of balance; 429 a rate limit. A server without a model list
(404, 405) is alive with its models unknown. A keyless local server is checked the same way: the
check then says whether it is up. These services show no tier.
"""

from __future__ import annotations

from proxy.keys.pool import CheckResult, Verdict
from proxy.keys.probe import Probe, model_ids


async def check(probe: Probe) -> CheckResult:
    listing = await probe.get("/models")
    if listing.status == 200:
        models = model_ids(listing.body)
        return CheckResult(Verdict.OK, models=frozenset(models) if models else None, detail="models 200")
    if listing.status in (404, 405):
        return CheckResult(Verdict.OK, detail=f"models {listing.status}: no model list")
    outcome = probe.classify(listing)
    verdict = outcome.verdict
    if listing.status == 403 and verdict is Verdict.RETRYABLE:
        verdict = Verdict.REVOKED  # the check's own plain request refused: the key is not allowed in
    if verdict not in (Verdict.REVOKED, Verdict.OVER_QUOTA, Verdict.RATE_LIMITED):
        verdict = Verdict.RETRYABLE
    return CheckResult(verdict, retry_after=outcome.retry_after, detail=f"models {listing.status}")
