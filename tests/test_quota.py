"""Quotas that mean what the owner set: usable to the end, never overshot, refused in a way
clients do not retry, and defaulted per family for new users. Real sockets throughout."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest

from proxy.access.gatekeeper import Gatekeeper
from proxy.access.tokens import count_prompt
from tests.conftest import PAID, Served
from tests.fakes import FakeAnthropic, FakeOpenAI, messages_tokens

ADMIN = "admin-key-for-quota-tests-01"
HAIKU = "claude-3-5-haiku-20241022"


@pytest.fixture
def served(proxy_app, fake_openai: FakeOpenAI) -> Served:
    return proxy_app(
        OPENAI_KEY=PAID,
        OPENAI_BASE_URL=fake_openai.base_url,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN,
        QUOTA_REFRESH_PERIOD="daily",
    )


def admin(served: Served) -> httpx.Client:
    return httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})


def new_user(served: Served, **fields) -> dict:
    reply = admin(served).post("/users", json={"nickname": "friend", **fields})
    assert reply.status_code == 201, reply.text
    return reply.json()


def used(served: Served, token: str, family: str = "gpt-4o") -> int:
    return admin(served).get(f"/users/{token}").json()["token_counts"].get(family, 0)


def sent_cap(request) -> int | None:
    body = request.json
    return body.get("max_completion_tokens", body.get("max_tokens"))


# 10. Exact and usable ---------------------------------------------------------------------------


def test_a_300_token_quota_can_be_used_for_a_whole_conversation(served: Served, fake_openai: FakeOpenAI) -> None:
    """SillyTavern-like: the history grows, max_tokens=300 each time. The first message used to be
    refused ("0 of 300 used; this request may need 1077")."""
    fake_openai.chunks = 40  # each reply is 40 tokens unless capped
    user = new_user(served, token_limits={"gpt-4o": 300})
    client = openai.OpenAI(base_url=served.proxy(), api_key=user["token"], max_retries=0)
    history = [{"role": "system", "content": "You are a friendly pirate."}]
    replies, refusal = 0, ""
    for turn in range(20):
        history.append({"role": "user", "content": f"Tell me about island number {turn}, briefly."})
        try:
            reply = client.chat.completions.create(model="gpt-4o", messages=history, max_tokens=300)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            refusal = str(exc)
            break
        replies += 1
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert replies >= 3  # the quota was usable, message after message
    spent = used(served, user["token"])
    assert spent <= 300  # never past its end
    # Refused only once the conversation's prompt alone no longer fits in what is left.
    match = re.search(r"prompt is about (\d+) tokens and (\d+) of 300 are left", refusal)
    assert match and int(match.group(2)) == 300 - spent and int(match.group(1)) >= int(match.group(2))
    assert any(sent_cap(r) < 300 for r in fake_openai.requests)  # a reply was capped to what was left


def test_thirty_concurrent_requests_on_a_3000_token_quota_are_never_charged_more(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    """Half set max_tokens=150, half set none; the model would write 2,000 tokens each. Clients
    retry the transient 'held by your requests in progress' 429 until they get an answer."""
    fake_openai.chunks = 2000
    fake_openai.hang_first_byte = 0.05  # so that requests overlap
    user = new_user(served, token_limits={"gpt-4o": 3000})
    headers = {"authorization": f"Bearer {user['token']}"}
    charged: list[int] = []
    statuses: list[int] = []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"Write a long story number {i}."}]}
        if i % 2:
            body["max_tokens"] = 150
        for _ in range(200):
            reply = await client.post(f"{served.proxy()}/chat/completions", json=body, headers=headers)
            if reply.status_code == 429 and reply.json()["error"]["code"] == "quota_held":
                await asyncio.sleep(0.02)
                continue
            statuses.append(reply.status_code)
            if reply.status_code == 200:
                charged.append(reply.json()["usage"]["total_tokens"])
            return

    async def all_of_them() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(*(one(i, client) for i in range(30)))

    asyncio.run(all_of_them())
    total = used(served, user["token"])
    assert total <= 3000, total  # never more than the quota: no rounding either
    assert total == sum(charged)  # charged exactly the upstream's numbers
    assert total >= 2900  # and it could be used to its end
    assert set(statuses) <= {200, 402} and 402 in statuses


def test_the_claude_door_caps_max_tokens_to_what_is_left(proxy_app, fake_anthropic: FakeAnthropic) -> None:
    served = proxy_app(ANTHROPIC_KEY="sk-ant-paid-0123456789", ANTHROPIC_BASE_URL=fake_anthropic.base_url,
                       GATEKEEPER="user_token", ADMIN_KEY=ADMIN)  # fmt: skip
    user = new_user(served, token_limits={"claude-haiku": 100})
    headers = {"x-api-key": user["token"], "anthropic-version": "2023-06-01"}
    body = {"model": HAIKU, "max_tokens": 4000, "messages": [{"role": "user", "content": "Hello there friend"}]}
    assert httpx.post(f"{served.proxy('anthropic')}/messages", json=body, headers=headers).status_code == 200
    sent = fake_anthropic.requests[-1].json["max_tokens"]
    assert 0 < sent < 100  # 100, less the prompt (counted with a margin for Claude's tokenizer)
    other = new_user(served, token_limits={"claude-haiku": 100})
    door = {"model": HAIKU, "messages": [{"role": "user", "content": "Hi"}]}  # OpenAI format, no max
    reply = httpx.post(f"{served.proxy('anthropic')}/chat/completions", json=door,
                       headers={"authorization": f"Bearer {other['token']}"})  # fmt: skip
    assert reply.status_code == 200
    assert 0 < fake_anthropic.requests[-1].json["max_tokens"] < 100  # not the door's default 4,096


@pytest.mark.parametrize(
    ("kind", "family", "payload", "field"),
    [
        ("chat", "o-series", {}, "max_completion_tokens"),  # reasoning models refuse max_tokens
        ("chat", "gpt-4o", {}, "max_tokens"),
        ("chat", "gpt-4o", {"max_completion_tokens": 900}, "max_completion_tokens"),
        ("chat", "gpt-5", {"max_tokens": 900}, "max_completion_tokens"),
        ("completions", "legacy-completions", {"max_tokens": 900}, "max_tokens"),
        ("messages", "claude-sonnet", {"max_tokens": 900, "thinking": {"budget_tokens": 800}}, "max_tokens"),
        ("generate", "gemini-flash", {}, "maxOutputTokens"),
    ],
)
def test_the_reply_cap_goes_in_the_field_the_model_reads(kind: str, family: str, payload: dict, field: str) -> None:
    from proxy.access.quota import apply_cap, output_ask, reply_allowance

    ask = output_ask(kind, family, payload, translated_default=4096)
    held, cap = reply_allowance(ask, 120)
    assert held == 120 and cap == 120
    apply_cap(kind, payload, cap, family)
    if kind == "generate":  # Gemini: generationConfig.maxOutputTokens
        assert payload["generationConfig"][field] == 120
        return
    assert payload[field] == 120 and len({"max_tokens", "max_completion_tokens"} & set(payload)) == 1
    if "thinking" in payload:
        assert payload["thinking"]["budget_tokens"] < 120


def test_a_reply_that_fits_is_left_as_the_client_asked() -> None:
    from proxy.access.quota import output_ask, reply_allowance

    assert reply_allowance(output_ask("chat", "gpt-4o", {"max_tokens": 50, "n": 2}, translated_default=4096), 500) == (
        100,
        None,
    )
    # No max set, and more left than the model can write: nothing to cap, its maximum is held.
    assert reply_allowance(output_ask("chat", "gpt-4", {}, translated_default=4096), 100_000) == (8192, None)


def test_user_concurrency_limit_refuses_one_more_request_in_progress(proxy_app, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token",
                       ADMIN_KEY=ADMIN, USER_CONCURRENCY_LIMIT="2")  # fmt: skip
    fake_openai.hang_first_byte = 0.5
    user = new_user(served)
    headers = {"authorization": f"Bearer {user['token']}"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(
                *(client.post(f"{served.proxy()}/chat/completions", json=body, headers=headers) for _ in range(5))
            )

    replies = asyncio.run(burst())
    assert sorted(r.status_code for r in replies) == [200, 200, 429, 429, 429]
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "at once" in refused.json()["error"]["message"]
    fake_openai.hang_first_byte = 0.0
    assert httpx.post(f"{served.proxy()}/chat/completions", json=body, headers=headers).status_code == 200


def test_me_says_what_is_left_and_what_is_in_progress(served: Served) -> None:
    user = new_user(served, token_limits={"gpt-4o": 300})
    client = openai.OpenAI(base_url=served.proxy(), api_key=user["token"], max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello there"}])
    me = httpx.get(f"{served.url}/proxy/me", headers={"authorization": f"Bearer {user['token']}"}).json()
    spent = used(served, user["token"])
    assert me["quota"]["gpt-4o"] == {"limit": 300, "used": spent, "in_progress": 0, "remaining": 300 - spent}
    assert me["requests_in_progress"] == 0 and me["quota_refills_at"] > time.time()


def test_the_prompt_is_counted_with_a_real_tokenizer_at_least_as_high_as_the_upstream() -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Internationalization, 東京, naïve café: 12345678 tokens?"},
    ]
    counted = count_prompt({"messages": messages}, bound=10_000)
    assert counted >= messages_tokens(messages)  # the fake's count: words + 3 per message
    assert 20 <= counted <= 60  # a tokenizer, not bytes / 4 of the body (which would say ~40 too, but:)
    assert count_prompt({"messages": [{"role": "user", "content": "word " * 1000}]}, bound=10_000) < 1100


def test_counting_stops_at_the_quota_and_a_huge_prompt_never_stalls_others(served: Served) -> None:
    user = new_user(served, token_limits={"gpt-4o": 500})
    huge = "x" * 9_000_000  # one 9 MB word: the slowest shape for BPE
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": huge}]}
    started = time.perf_counter()
    counted = count_prompt(body, bound=500)
    assert counted == 501 and time.perf_counter() - started < 0.2  # stopped at the bound

    async def race() -> tuple[httpx.Response, list[float]]:
        async with httpx.AsyncClient(timeout=30) as client:
            post = asyncio.create_task(
                client.post(f"{served.proxy()}/chat/completions", json=body,
                            headers={"authorization": f"Bearer {user['token']}"})  # fmt: skip
            )
            pings = []
            while not post.done():
                t = time.perf_counter()
                assert (await client.get(f"{served.url}/health")).status_code == 200
                pings.append(time.perf_counter() - t)
                await asyncio.sleep(0.01)
            return await post, pings

    reply, pings = asyncio.run(race())
    assert reply.status_code == 402 and "prompt" in reply.json()["error"]["message"]
    assert max(pings, default=0) < 0.5


def test_the_tokenizer_loads_with_the_network_off() -> None:
    """Its data comes from the installed packages: tiktoken would otherwise download it."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not available")
    code = (
        "import os, tempfile; os.environ['TIKTOKEN_CACHE_DIR'] = tempfile.mkdtemp();"
        "from proxy.access.tokens import encoding; print(len(encoding().encode_ordinary('hello world')))"
    )
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a network namespace here")
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


# 11. A spent quota is not a rate limit ---------------------------------------------------------


def test_a_spent_quota_answers_402_that_the_openai_sdk_does_not_retry(served: Served, fake_openai: FakeOpenAI) -> None:
    user = new_user(served, token_limits={"gpt-4o": 50})
    admin(served).patch(f"/users/{user['token']}", json={"token_counts": {"gpt-4o": 50}})
    attempts: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [attempts.append]})
    client = openai.OpenAI(base_url=served.proxy(), api_key=user["token"], max_retries=3, http_client=http)

    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])

    assert len(attempts) == 1 and time.monotonic() - started < 2  # asked once, not retried
    error = refused.value
    assert error.status_code == 402 and error.response.headers["x-should-retry"] == "false"
    assert error.code == "quota_exceeded"
    message = error.body["message"]
    assert "spent: 50 of 50" in message and "refills at" in message  # what is spent, when it refills
    assert fake_openai.requests == []


def test_a_spent_quota_through_the_anthropic_sdk_is_a_billing_error_not_retried(
    proxy_app, fake_anthropic: FakeAnthropic
) -> None:
    import anthropic

    served = proxy_app(ANTHROPIC_KEY="sk-ant-paid-0123456789", ANTHROPIC_BASE_URL=fake_anthropic.base_url,
                       GATEKEEPER="user_token", ADMIN_KEY=ADMIN)  # fmt: skip
    user = new_user(served, token_limits={"claude-haiku": 10})
    admin(served).patch(f"/users/{user['token']}", json={"token_counts": {"claude-haiku": 10}})
    attempts: list = []
    http = anthropic.DefaultHttpxClient(event_hooks={"request": [attempts.append]})
    client = anthropic.Anthropic(base_url=f"{served.url}/proxy/anthropic", api_key=user["token"], max_retries=3,
                                 http_client=http)  # fmt: skip
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(model=HAIKU, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert len(attempts) == 1 and refused.value.status_code == 402
    assert refused.value.body["error"]["type"] == "billing_error"


def test_real_rate_limits_keep_429_with_retry_after(proxy_app, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token",
                       ADMIN_KEY=ADMIN, TEXT_MODEL_RATE_LIMIT="1")  # fmt: skip
    user = new_user(served, token_limits={"gpt-4o": 100_000})
    headers = {"authorization": f"Bearer {user['token']}"}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{served.proxy()}/chat/completions", json=body, headers=headers).status_code == 200
    limited = httpx.post(f"{served.proxy()}/chat/completions", json=body, headers=headers)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "x-should-retry" not in limited.headers


# 12. Default quotas per family ------------------------------------------------------------------


def test_new_users_get_the_token_quota_defaults_per_family(proxy_app, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token",
                       ADMIN_KEY=ADMIN, TOKEN_QUOTA_GPT4O="1000", TOKEN_QUOTA_GPT_4="2000")  # fmt: skip
    plain = new_user(served)
    assert plain["token_limits"] == {"gpt-4o": 1000, "gpt-4": 2000}
    custom = new_user(served, token_limits={"gpt-4o": 5, "gpt-4": 0})  # 0: no limit, on purpose
    assert custom["token_limits"] == {"gpt-4o": 5}
    admin(served).patch(f"/users/{plain['token']}", json={"token_counts": {"gpt-4": 2000}})
    client = openai.OpenAI(base_url=served.proxy(), api_key=plain["token"], max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="gpt-4-0613", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 402  # limited on gpt-4 too, not only on gpt-4o


def test_the_admin_tab_says_what_an_empty_limits_field_means() -> None:
    from ui.admin import quota_defaults_text

    assert "no limit" in quota_defaults_text({}) and "TOKEN_QUOTA_" in quota_defaults_text({})
    text = quota_defaults_text({"gpt-4o": 100_000})
    assert "gpt-4o=100,000" in text and "other family has no limit" in text


def test_gatekeeper_counts_nothing_when_no_quota_applies(tmp_path) -> None:
    from tests.conftest import make_settings

    gk = Gatekeeper(make_settings({"PROXY_KEY": "pk-some-key-123"}, tmp_path))
    payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 1000}], "max_tokens": 99}
    admission = asyncio.run(gk.admit_request(gk.identify("pk-some-key-123", "10.0.0.1"), "gpt-4o", "chat", payload))
    assert admission.quota_left is None and admission.reservation is None and payload["max_tokens"] == 99


def test_the_responses_api_reply_cap_is_max_output_tokens() -> None:
    from proxy.access.quota import apply_cap, output_ask, reply_allowance

    payload = {"model": "gpt-4o", "input": "hi", "max_output_tokens": 900}
    held, cap = reply_allowance(output_ask("responses", "gpt-4o", payload, translated_default=4096), 120)
    apply_cap("responses", payload, cap, "gpt-4o")
    assert (held, payload["max_output_tokens"]) == (120, 120) and "max_tokens" not in payload


def test_counting_tokens_is_free_even_with_a_spent_quota(proxy_app, fake_anthropic: FakeAnthropic) -> None:
    served = proxy_app(ANTHROPIC_KEY="sk-ant-paid-0123456789", ANTHROPIC_BASE_URL=fake_anthropic.base_url,
                       GATEKEEPER="user_token", ADMIN_KEY=ADMIN)  # fmt: skip
    user = new_user(served, token_limits={"claude-haiku": 10})
    admin(served).patch(f"/users/{user['token']}", json={"token_counts": {"claude-haiku": 10}})
    headers = {"x-api-key": user["token"], "anthropic-version": "2023-06-01"}
    body = {"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]}
    counted = httpx.post(f"{served.proxy('anthropic')}/messages/count_tokens", json=body, headers=headers)
    assert counted.status_code == 200, counted.text
    spent = httpx.post(f"{served.proxy('anthropic')}/messages", json={**body, "max_tokens": 5}, headers=headers)
    assert spent.status_code == 402


def test_a_stream_cut_short_is_charged_within_what_was_held(served: Served, fake_openai: FakeOpenAI) -> None:
    """With no usage from the upstream, the prompt is charged as counted for the quota, not as
    body bytes / 4 (which counts every field, here a 2 KB `user` tag, and overshoots)."""
    fake_openai.chunks, fake_openai.stream_delay = 40, 0.05
    user = new_user(served, token_limits={"gpt-4o": 60})
    body = {"model": "gpt-4o", "stream": True, "user": "t" * 2000, "messages": [{"role": "user", "content": "Hi"}]}
    headers = {"authorization": f"Bearer {user['token']}"}
    with httpx.stream("POST", f"{served.proxy()}/chat/completions", json=body, headers=headers) as reply:
        assert reply.status_code == 200
        next(reply.iter_raw())  # the first chunk, then hang up
    deadline = time.monotonic() + 5
    while used(served, user["token"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 0 < used(served, user["token"]) <= 60


def test_gemini_prompts_are_counted_and_inline_images_are_not_read_as_text() -> None:
    image = {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo" * 20_000}}
    payload = {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": "What is in this picture?"}, image]}],
    }
    counted = count_prompt(payload, bound=100_000)
    assert 1600 < counted < 1650  # the words, and one image at its flat allowance
