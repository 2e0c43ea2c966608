"""Checking a Gemini key for next to nothing.

1. `GET /v1beta/models?pageSize=1000` (free): an invalid, expired or suspended key, or one whose
   project has the API disabled, is refused (400 API_KEY_INVALID, 403 ...); a live key lists the
   models it can use (only those that generate content are kept).
2. `POST /v1beta/models/{cheapest}:generateContent` with `maxOutputTokens: 1` and a two-letter prompt
   on the cheapest listed model (a Flash-Lite): a few tokens, free on the free tier. This is where
   a key out of quota (429 RESOURCE_EXHAUSTED), with billing disabled (403 BILLING_DISABLED, or 400
   "enable billing" where the free tier is not offered) or rate-limited shows it.

Tier: the API shows none on success. A quota violation naming a `FreeTier` quota (in a 429 of the
probe) marks the key `trial`; a key that answered without one stays `unknown`.
"""

from __future__ import annotations

from proxy.keys.pool import CheckResult, Verdict
from proxy.keys.probe import Probe, cheapest, listing_verdict, probe_verdict
from proxy.providers.google.dialect import generation_models
from proxy.providers.google.errors import error_info, unwrap

PROBE_MODELS = ("gemini-2.0-flash-lite", "gemini-2.5-flash-lite", "gemini-flash-lite", "gemini-2.0-flash",
                "gemini-2.5-flash", "gemini-flash")  # fmt: skip
FALLBACK_MODEL = "gemini-2.0-flash-lite"
MAX_PAGES = 5


async def check(probe: Probe) -> CheckResult:
    models: set[str] = set()
    token = ""
    for _ in range(MAX_PAGES):
        listing = await probe.get("/v1beta/models?pageSize=1000" + (f"&pageToken={token}" if token else ""))
        if listing.status != 200:
            outcome = probe.classify(listing)
            verdict = Verdict.REVOKED if listing.status == 403 else listing_verdict(outcome)
            return CheckResult(verdict, retry_after=outcome.retry_after, detail=f"models {listing.status}")
        models |= generation_models(listing.body)
        body = listing.body if isinstance(listing.body, dict) else {}
        token = str(body.get("nextPageToken") or "")
        if not token or not token.replace("-", "").replace("_", "").isalnum():
            break
    model = cheapest(models, PROBE_MODELS, "google-ai") or FALLBACK_MODEL
    payload = {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "generationConfig": {"maxOutputTokens": 1},
    }
    reply = await probe.post(f"/v1beta/models/{model}:generateContent", payload)
    outcome = probe.classify(reply)
    _, quota = error_info(unwrap(reply.body))
    tier = "trial" if "FreeTier" in quota.get("id", "") else None
    verdict = Verdict.OK if reply.status == 200 else probe_verdict(outcome)
    if reply.status == 403 and verdict is Verdict.RETRYABLE:
        verdict = Verdict.REVOKED  # the check's own plain request refused: the key is not allowed in
    return CheckResult(
        verdict,
        models=frozenset(models),
        tier=tier,
        retry_after=outcome.retry_after,
        detail=f"probe {model} {reply.status}",
    )
