"""Checking a Claude key for next to nothing.

1. `GET /v1/models` (free, paginated): a revoked key gets 401; a live key lists its models.
2. `POST /v1/messages` with `max_tokens: 1` and a two-letter prompt on the cheapest model the
   key lists (a Haiku): about ten input tokens and one output token, a few millionths of a dollar.
   Anthropic refuses an out-of-credit key here with 400 "credit balance is too low" and a revoked
   or disabled one with 401/403; the dialect's `classify` reads these, as at request time, except
   that here any 403 revokes: the check's requests are the proxy's own, plain ones, so a 403 is
   about the key (at request time it may be about what the client asked for).
   `count_tokens` is free too, but Anthropic does not document that it refuses an out-of-credit
   key, and a check must tell exactly that; an invalid request (the OpenAI trick) may be refused
   before billing is looked at.

The request limit per minute tells the tier: at most 5 (the free evaluation tier) is a trial key.
"""

from __future__ import annotations

from proxy.keys.pool import CheckResult, Outcome, Verdict
from proxy.keys.probe import Probe, Reply, cheapest, listing_verdict, model_ids, probe_verdict, read_limits, tier_of

TRIAL_MAX_RPM = 5
LIMIT_HEADERS = {
    "requests": "anthropic-ratelimit-requests-limit",
    "tokens": "anthropic-ratelimit-tokens-limit",
    "input_tokens": "anthropic-ratelimit-input-tokens-limit",
    "output_tokens": "anthropic-ratelimit-output-tokens-limit",
}
PROBE_MODELS = ("claude-3-haiku", "claude-3-5-haiku", "claude-haiku", "claude-3-5-sonnet", "claude-sonnet")
FALLBACK_MODEL = "claude-3-5-haiku-latest"
MAX_PAGES = 10


def classify(probe: Probe, reply: Reply) -> Outcome:
    """The dialect's reading of a reply, with any 403 to the check's own plain request a revocation."""
    if reply.status == 403:
        return Outcome(Verdict.REVOKED)
    return probe.classify(reply)


async def check(probe: Probe) -> CheckResult:
    models: list[str] = []
    after = ""
    for _ in range(MAX_PAGES):
        listing = await probe.get("/models?limit=1000" + (f"&after_id={after}" if after else ""))
        if listing.status != 200:
            outcome = classify(probe, listing)
            return CheckResult(
                listing_verdict(outcome), retry_after=outcome.retry_after, detail=f"models {listing.status}"
            )
        page = model_ids(listing.body)
        models += page
        body = listing.body if isinstance(listing.body, dict) else {}
        after = str(body.get("last_id") or "")
        if not body.get("has_more") or not page or not after:
            break
    model = cheapest(models, PROBE_MODELS, "anthropic") or FALLBACK_MODEL
    payload = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    reply = await probe.post("/messages", payload)
    limits = read_limits(reply.headers, LIMIT_HEADERS) or read_limits(listing.headers, LIMIT_HEADERS)
    outcome = classify(probe, reply)
    return CheckResult(
        probe_verdict(outcome) if reply.status != 200 else Verdict.OK,
        models=frozenset(models),
        limits=limits,
        tier=tier_of(limits, TRIAL_MAX_RPM) if limits else None,
        retry_after=outcome.retry_after,
        detail=f"probe {model} {reply.status}",
    )
