"""Checking an OpenAI key without spending its owner's money.

Two calls, both free:
1. `GET /models`: a revoked key gets 401; a live key lists the models it may use.
2. `POST /chat/completions` with `max_tokens: 0`, a request no model accepts. A live key within
   quota is answered 400 (nothing is generated, nothing billed) with its rate-limit headers; a key
   out of quota gets 429 `insufficient_quota` (or `billing_not_active`), a revoked one 401, a
   rate-limited one 429 with a reset time. The same trick as the Node oai-reverse-proxy checker.

The request limit per minute tells the tier: at most 250 is a trial (free) key.
"""

from __future__ import annotations

from proxy.keys.pool import CheckResult, Verdict
from proxy.keys.probe import Probe, cheapest, listing_verdict, model_ids, probe_verdict, read_limits, tier_of

TRIAL_MAX_RPM = 250
LIMIT_HEADERS = {"requests": "x-ratelimit-limit-requests", "tokens": "x-ratelimit-limit-tokens"}
# The probe costs nothing whatever the model; these answer with the limits most requests meet.
PROBE_MODELS = ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-3.5-turbo", "gpt-4o", "gpt-4.1", "gpt-4")
FALLBACK_MODEL = "gpt-4o-mini"


async def check(probe: Probe) -> CheckResult:
    listing = await probe.get("/models")
    if listing.status != 200:
        outcome = probe.classify(listing)
        return CheckResult(listing_verdict(outcome), retry_after=outcome.retry_after, detail=f"models {listing.status}")
    models = frozenset(model_ids(listing.body))
    model = cheapest(models, PROBE_MODELS, "openai") or FALLBACK_MODEL
    payload = {"model": model, "max_tokens": 0, "messages": [{"role": "user", "content": ""}]}
    reply = await probe.post("/chat/completions", payload)
    limits = read_limits(reply.headers, LIMIT_HEADERS) or read_limits(listing.headers, LIMIT_HEADERS)
    outcome = probe.classify(reply)
    return CheckResult(
        probe_verdict(outcome) if reply.status != 200 else Verdict.OK,
        models=models,
        limits=limits,
        tier=tier_of(limits, TRIAL_MAX_RPM) if limits else None,
        retry_after=outcome.retry_after,
        detail=f"probe {model} {reply.status}",
    )
