"""Refusals by the proxy itself: counted in the usage ledger with their reason, and, with
ERRORS_AS_CHAT, answered as a normal chat reply that SillyTavern's backend reads like any other.

The requests here are shaped like SillyTavern's server-side chat-completions backend
(src/endpoints/backends/chat-completions.js): the OpenAI source posts to `<proxy>/chat/completions`
with `Authorization: Bearer <password>` and reads `choices[0].message.content` (non-streamed, only
when `response.ok`) or pipes the SSE on (its page reads `choices[0].delta.content`); the Claude
source posts to `<proxy>/messages` with `x-api-key` and reads `content[0].text` (non-streamed,
only when `response.ok`; otherwise it shows just "Unauthorized" / "Not Found") or pipes the SSE
on (its page reads `delta.text`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from proxy.error_chat import MARK_HEADER
from tests.conftest import PAID, Served
from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour

ANT = "sk-ant-paid-0123456789"
ADMIN = "admin-key-for-refusal-tests"
OPENAI_MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo", "text-embedding-3-small"]
CLAUDE_MODELS = ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"]


# ---------------------------------------------------------------- requests shaped like SillyTavern's


def st_openai(base: str, password: str, model: str, stream: bool) -> tuple[int, str, httpx.Headers]:
    """What SillyTavern's OpenAI source sends and what text its chat then shows ("" if none)."""
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "model": model,
        "temperature": 1,
        "max_tokens": 300,
        "stream": stream,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_p": 1,
        "stop": [],
        "logit_bias": {},
        "seed": None,
        "n": 1,
    }
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + password}
    reply = httpx.post(base + "/chat/completions", json=body, headers=headers, timeout=30)
    if not stream:
        if reply.status_code >= 300:  # `fetchResponse.ok` false: the text is lost (or a 429 retried)
            return reply.status_code, "", reply.headers
        return reply.status_code, reply.json()["choices"][0]["message"]["content"], reply.headers
    text = ""
    for data in sse_data(reply.text):
        if data == "[DONE]":
            break
        text += json.loads(data)["choices"][0].get("delta", {}).get("content") or ""
    return reply.status_code, text, reply.headers


def st_claude(base: str, password: str, model: str, stream: bool) -> tuple[int, str, httpx.Headers]:
    """What SillyTavern's Claude source sends and what text its chat then shows ("" if none)."""
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "model": model,
        "max_tokens": 300,
        "stop_sequences": [],
        "temperature": 1,
        "top_p": 1,
        "top_k": 0,
        "stream": stream,
    }
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01", "x-api-key": password}
    reply = httpx.post(base + "/messages", json=body, headers=headers, timeout=30)
    if not stream:
        if reply.status_code >= 300:  # SillyTavern answers {error: true}: "Unauthorized", "Not Found"
            return reply.status_code, "", reply.headers
        return reply.status_code, reply.json()["content"][0]["text"], reply.headers
    text = ""
    for data in sse_data(reply.text):
        event = json.loads(data)
        if event.get("type") == "content_block_delta":
            text += event["delta"].get("text") or ""
    return reply.status_code, text, reply.headers


def sse_data(raw: str) -> Iterator[str]:
    for block in raw.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data:"):
                yield line[5:].strip()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeAnthropic]]:
    with (
        FakeOpenAI({PAID: KeyBehaviour("paid", models=OPENAI_MODELS)}) as openai,
        FakeAnthropic({ANT: KeyBehaviour("paid", models=CLAUDE_MODELS)}) as anthropic,
    ):
        yield openai, anthropic


@pytest.fixture
def start(
    upstreams: tuple[FakeOpenAI, FakeAnthropic], proxy_app: Callable[..., Served]
) -> Callable[..., Served]:
    """Serve the proxy in user-token mode over both fakes; returns once every key is checked."""
    openai, anthropic = upstreams
    openai.reset()
    anthropic.reset()
    openai.next_status.clear()

    def run(**env: str) -> Served:
        served = proxy_app(
            OPENAI_KEY=PAID,
            OPENAI_BASE_URL=openai.base_url,
            ANTHROPIC_KEY=ANT,
            ANTHROPIC_BASE_URL=anthropic.base_url,
            GATEKEEPER="user_token",
            ADMIN_KEY=ADMIN,
            CHECK_KEYS="true",
            TEXT_MODEL_RATE_LIMIT="2",
            **env,
        )
        keys = lambda: served.runtime.status()["keys"]  # noqa: E731
        assert openai.wait_for(
            lambda: all(s["unchecked"] == 0 and not s["checking"] for s in keys().values()), timeout=15
        ), keys()
        return served

    return run


def token(served: Served, **limits: int) -> str:
    return served.runtime.access.users.create(nickname="friend", token_limits=limits or None).token


REFUSALS: list[tuple[str, str, str, str]] = [
    # (what, service, model, expected words in the text)
    ("wrong key", "openai", "gpt-4o-mini", "user token is not valid"),
    ("model not served", "openai", "gpt-4-turbo", "closest: "),
    ("quota", "openai", "gpt-4o", "quota"),
    ("wrong key", "anthropic", "claude-haiku-4-5", "user token is not valid"),
    ("model not served", "anthropic", "claude-3-opus-20240229", "closest: claude-"),
    ("quota", "anthropic", "claude-sonnet-4-5", "quota"),
]


def credential_for(served: Served, what: str) -> str:
    if what == "wrong key":
        return "not-a-user-token"
    if what == "quota":
        return token(served, **{"gpt-4o": 1, "claude-sonnet": 1})
    return token(served)


# ---------------------------------------------------------------- ERRORS_AS_CHAT


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("what", "service", "model", "words"), REFUSALS)
def test_with_errors_as_chat_sillytavern_shows_each_refusal_as_the_reply(
    start: Callable[..., Served], what: str, service: str, model: str, words: str, stream: bool
) -> None:
    served = start(ERRORS_AS_CHAT="true")
    ask = st_claude if service == "anthropic" else st_openai
    status, text, headers = ask(served.proxy(service), credential_for(served, what), model, stream)
    assert status == 200
    assert text.startswith("⚠️ Proxy error (") and words in text, text
    assert headers[MARK_HEADER].split()[0] in ("401", "402", "403", "404", "429")  # 402: a spent quota
    if what == "model not served":
        assert model in text


def test_without_errors_as_chat_the_refusals_stay_http_errors(start: Callable[..., Served]) -> None:
    served = start()
    status, text, headers = st_openai(served.proxy(), "not-a-user-token", "gpt-4o-mini", stream=False)
    assert (status, text) == (401, "")
    assert MARK_HEADER not in headers
    reply = httpx.post(
        served.proxy() + "/chat/completions",
        json={"model": "gpt-4-turbo", "messages": [{"role": "user", "content": "Hi"}]},
        headers={"Authorization": "Bearer " + token(served)},
        timeout=30,
    )
    assert reply.status_code == 404
    message = reply.json()["error"]["message"]
    assert "gpt-4-turbo" in message and "closest: gpt-" in message


def test_a_rate_limit_refusal_is_a_chat_reply_too(start: Callable[..., Served]) -> None:
    served = start(ERRORS_AS_CHAT="true")
    friend = token(served)
    texts = [st_openai(served.proxy(), friend, "gpt-4o-mini", stream=False) for _ in range(3)]
    assert [t[0] for t in texts] == [200, 200, 200]
    assert not texts[0][1].startswith("⚠️") and MARK_HEADER not in texts[0][2]
    assert "Too many requests" in texts[2][1] and texts[2][2][MARK_HEADER].startswith("429")


def test_an_upstream_error_reply_is_never_rewritten(
    start: Callable[..., Served], upstreams: tuple[FakeOpenAI, FakeAnthropic]
) -> None:
    served = start(ERRORS_AS_CHAT="true")
    openai, _ = upstreams
    bad = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error", "code": None}}
    openai.next_status.append((400, bad))
    reply = httpx.post(
        served.proxy() + "/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        headers={"Authorization": "Bearer " + token(served)},
        timeout=30,
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "max_tokens is too large"
    assert MARK_HEADER not in reply.headers


def test_the_undated_id_of_a_listed_dated_claude_model_goes_to_the_upstream(
    start: Callable[..., Served], upstreams: tuple[FakeOpenAI, FakeAnthropic]
) -> None:
    """The key lists claude-haiku-4-5-20251001 only: the alias is not refused as "not served" but
    sent on (Anthropic answers both; the fake here knows only listed ids)."""
    served = start()
    _, anthropic = upstreams
    anthropic.reset()
    st_claude(served.proxy("anthropic"), token(served), "claude-haiku-4-5", stream=False)
    sent = [r.json["model"] for r in anthropic.requests if r.path == "/v1/messages"]
    assert sent == ["claude-haiku-4-5"]


# ---------------------------------------------------------------- every outcome is counted


def test_every_outcome_is_counted_with_why_the_proxy_refused(
    start: Callable[..., Served], upstreams: tuple[FakeOpenAI, FakeAnthropic]
) -> None:
    served = start()
    friend, poor = token(served), token(served, **{"gpt-4o": 1})
    st_openai(served.proxy(), friend, "gpt-4o-mini", stream=False)  # served
    st_openai(served.proxy(), "wrong-token", "gpt-4o-mini", stream=False)  # wrong key
    st_openai(served.proxy(), poor, "gpt-4-turbo", stream=False)  # model not served
    st_openai(served.proxy(), poor, "gpt-4o", stream=True)  # over quota
    st_openai(served.proxy(), friend, "gpt-4o-mini", stream=False)  # served: the 2nd this minute
    st_openai(served.proxy(), friend, "gpt-4o-mini", stream=False)  # rate limit (2 a minute)
    upstreams[0].next_status.append((500, {"error": {"message": "boom", "type": "server_error"}}))
    st_openai(served.proxy(), poor, "gpt-4o-mini", stream=False)  # failed upstream
    httpx.get(served.proxy() + "/models", headers={"Authorization": "Bearer wrong"}, timeout=10)  # not work

    expected = {
        "served": 2,
        "refused: wrong key": 1,
        "refused: model": 1,
        "refused: quota": 1,
        "refused: rate limit": 1,
        "failed": 1,
    }
    status = httpx.get(served.url + "/status", timeout=10).json()
    assert status["usage"]["outcomes"] == expected
    assert status["usage"]["requests"] == 2  # the served totals count what was served
    assert sum(p["outcomes"].get(k, 0) for p in served.runtime.ledger.series() for k in expected) == 7
    recent = served.runtime.ledger.recent(20)
    assert [e["outcome"] for e in recent][::-1] == [
        "served",
        "refused: wrong key",
        "refused: model",
        "refused: quota",
        "served",
        "refused: rate limit",
        "failed",
    ]
    assert all(ANT not in json.dumps(e) and PAID not in json.dumps(e) for e in recent)
    assert status["usage"]["active_users_1m"] == 2  # the two users that got in


def test_a_client_that_leaves_before_the_reply_is_counted_as_cancelled(proxy_app: Callable[..., Served]) -> None:
    """Non-negotiable 9: every outcome is counted. A non-streamed request whose client hung up
    while the upstream was still thinking was in no count at all."""
    with FakeOpenAI({PAID: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url)
        fake.hang_first_byte = 3.0
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.proxy() + "/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
        ledger = served.runtime.ledger
        deadline = time.monotonic() + 5
        while not ledger.recent(1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ledger.outcomes.get("cancelled") == 1, ledger.outcomes
        event = ledger.recent(1)[0]
        assert (event["outcome"], event["model"], event["status"]) == ("cancelled", "gpt-4o", 499)
