"""What Gemini's error replies say about a key, and how they read in OpenAI's shape (pure)."""

from __future__ import annotations

import pytest

from proxy.keys.pool import Verdict
from proxy.providers.compatible import Compatible
from proxy.providers.google import Gemini
from proxy.providers.google.errors import google_error_to_openai
from tests.fakes_gemini import ERROR_INFO, QUOTA_FAILURE, RETRY_INFO, google_error


def reason(name: str) -> dict:
    return {"@type": ERROR_INFO, "reason": name, "domain": "googleapis.com"}


def quota(quota_id: str, value: str) -> dict:
    return {"@type": QUOTA_FAILURE, "violations": [{"quotaId": quota_id, "quotaValue": value}]}


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (400, google_error(400, "INVALID_ARGUMENT", "API key not valid.", reason("API_KEY_INVALID")), Verdict.REVOKED),
        (400, google_error(400, "INVALID_ARGUMENT", "API key expired.", reason("API_KEY_EXPIRED")), Verdict.REVOKED),
        (403, google_error(403, "PERMISSION_DENIED", "Consumer suspended.", reason("CONSUMER_SUSPENDED")),
         Verdict.REVOKED),
        (403, google_error(403, "PERMISSION_DENIED", "API disabled.", reason("SERVICE_DISABLED")), Verdict.REVOKED),
        (403, google_error(403, "PERMISSION_DENIED", "Billing.", reason("BILLING_DISABLED")), Verdict.OVER_QUOTA),
        (400, google_error(400, "FAILED_PRECONDITION", "Gemini API free tier is not available in your country. "
                           "Please enable billing on your project in Google AI Studio."), Verdict.OVER_QUOTA),
        (429, google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded, limit: 0, model: gemini-2.5-pro",
                           quota("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "0")), Verdict.MODEL_MISSING),
        (429, google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota."), Verdict.RATE_LIMITED),
        (403, google_error(403, "PERMISSION_DENIED", "The caller does not have permission"), Verdict.RETRYABLE),
        (503, google_error(503, "UNAVAILABLE", "The model is overloaded."), Verdict.RETRYABLE),
        (404, google_error(404, "NOT_FOUND", "models/x is not found for API version v1beta"), Verdict.CLIENT_ERROR),
        # Messages may echo what the client sent: only Google's reasons and statuses count.
        (400, google_error(400, "INVALID_ARGUMENT", "API key not valid (echoed)."), Verdict.CLIENT_ERROR),
        (400, google_error(400, "INVALID_ARGUMENT", 'Invalid value "please enable billing"'), Verdict.CLIENT_ERROR),
        (400, [google_error(400, "INVALID_ARGUMENT", "Not valid.", reason("API_KEY_INVALID"))], Verdict.REVOKED),
    ],
)  # fmt: skip
def test_gemini_errors_classify_by_googles_own_reasons(status: int, body: object, verdict: Verdict) -> None:
    assert Gemini().classify(status, {}, body).verdict is verdict


def test_a_rate_limit_waits_as_long_as_retry_info_says_else_until_the_daily_reset() -> None:
    body = google_error(429, "RESOURCE_EXHAUSTED", "x", {"@type": RETRY_INFO, "retryDelay": "37s"})
    assert Gemini().classify(429, {}, body).retry_after == 37
    daily = google_error(429, "RESOURCE_EXHAUSTED", "x", quota("GenerateRequestsPerDayPerProjectPerModel", "250"))
    wait = Gemini().classify(429, {}, daily).retry_after
    assert wait is not None and 0 < wait <= 25 * 3600  # midnight Pacific (23 to 25 hours away at most)


def test_google_errors_read_in_openai_shape() -> None:
    body = [google_error(400, "INVALID_ARGUMENT", "API key not valid.", reason("API_KEY_INVALID"))]
    assert google_error_to_openai(400, body) == {
        "error": {"message": "API key not valid.", "type": "invalid_request_error", "param": None,
                  "code": "api_key_invalid"}
    }  # fmt: skip
    already = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}
    assert google_error_to_openai(400, already) is already
    assert google_error_to_openai(502, b"not json") == b"not json"


@pytest.mark.parametrize(
    ("status", "message", "verdict"),
    [
        (402, "Insufficient Balance", Verdict.OVER_QUOTA),  # DeepSeek, OpenRouter
        (403, "Your team has no credits yet", Verdict.OVER_QUOTA),  # xAI
        (401, "Authentication Fails", Verdict.REVOKED),
        (429, "Rate limit reached", Verdict.RATE_LIMITED),
        (404, "Not Found", Verdict.CLIENT_ERROR),  # a route the service does not have
    ],
)
def test_compatible_services_money_errors(status: int, message: str, verdict: Verdict) -> None:
    body = {"error": {"message": message, "type": "x"}}
    assert Compatible("svc").classify(status, {}, body).verdict is verdict


def test_usage_metadata_counts_cached_prompt_tool_use_and_thoughts() -> None:
    from proxy.providers.google.dialect import usage_from_metadata

    usage = usage_from_metadata({
        "promptTokenCount": 1000, "cachedContentTokenCount": 800, "toolUsePromptTokenCount": 20,
        "candidatesTokenCount": 50, "thoughtsTokenCount": 120, "totalTokenCount": 1190,
    })  # fmt: skip
    assert usage is not None
    assert (usage.tokens_in, usage.tokens_out, usage.cached, usage.reasoning) == (1020, 170, 800, 120)
    assert usage_from_metadata(None) is None
