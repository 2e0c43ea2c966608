"""Per-user tokens end to end: exact usage through the real proxy, limits, and a SIGKILL restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import PAID, Served
from tests.fakes import FakeAnthropic, FakeOpenAI

ADMIN = "admin-key-for-tests-0001"
ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello there friend"}]


@pytest.fixture
def served(proxy_app, fake_openai: FakeOpenAI) -> Served:
    return proxy_app(
        OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN
    )


def admin(served: Served) -> httpx.Client:
    return httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})


def new_user(served: Served, **fields) -> dict:
    reply = admin(served).post("/users", json={"nickname": "alice", **fields})
    assert reply.status_code == 201, reply.text
    return reply.json()


def user_of(served: Served, token: str) -> dict:
    reply = admin(served).get(f"/users/{token}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_non_streamed_usage_is_charged_exactly_from_the_upstream_numbers(served: Served) -> None:
    user = new_user(served)
    client = openai.OpenAI(base_url=served.proxy(), api_key=user["token"], max_retries=0)

    reply = client.chat.completions.create(model="gpt-4o", messages=HELLO)

    after = user_of(served, user["token"])
    assert after["prompt_count"] == 1
    assert after["token_counts"] == {"gpt-4o": reply.usage.prompt_tokens + reply.usage.completion_tokens}
    status = httpx.get(f"{served.url}/status").json()["usage"]
    assert status["by_family"]["gpt-4o"]["tokens_in"] == reply.usage.prompt_tokens
    assert status["by_family"]["gpt-4o"]["tokens_out"] == reply.usage.completion_tokens


@pytest.mark.parametrize("client_asks_for_usage", [False, True])
def test_streamed_usage_is_exact_and_the_usage_chunk_reaches_only_clients_that_asked(
    served: Served, fake_openai: FakeOpenAI, client_asks_for_usage: bool
) -> None:
    user = new_user(served)
    client = openai.OpenAI(base_url=served.proxy(), api_key=user["token"], max_retries=0)
    options = {"stream_options": {"include_usage": True}} if client_asks_for_usage else {}

    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True, **options))

    upstream_body = fake_openai.requests[-1].json
    assert upstream_body["stream_options"] == {"include_usage": True}  # the proxy always asks
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if client_asks_for_usage else 0)
    # The same request, not streamed, tells us the exact numbers the upstream reports.
    exact = client.chat.completions.create(model="gpt-4o", messages=HELLO).usage
    after = user_of(served, user["token"])
    assert after["prompt_count"] == 2
    assert after["token_counts"]["gpt-4o"] == 2 * (exact.prompt_tokens + exact.completion_tokens)


def test_a_client_that_aborts_a_stream_is_charged_what_was_streamed(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    user = new_user(served)
    fake_openai.stream_delay = 0.3
    fake_openai.chunks = 20
    body = {"model": "gpt-4o", "messages": HELLO, "stream": True}
    headers = {"authorization": f"Bearer {user['token']}"}
    with httpx.stream("POST", f"{served.proxy()}/chat/completions", json=body, headers=headers) as reply:
        lines = reply.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any(line.startswith("data: ") for line in received)
    assert fake_openai.wait_for(lambda: fake_openai.closed_early == 1, timeout=3)

    def charged() -> int:
        return user_of(served, user["token"])["token_counts"].get("gpt-4o", 0)

    deadline = time.monotonic() + 3
    while charged() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    spent = charged()
    assert 0 < spent < 100  # an estimate of the prompt and the few tokens streamed, not nothing
    assert user_of(served, user["token"])["prompt_count"] == 1


def test_out_of_quota_is_refused_with_a_message_that_says_quota_and_reaches_no_upstream(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    # Requests are admitted while quota is left (the last one's reply capped to fit), then refused.
    user = new_user(served, token_limits={"gpt-4o": 30})
    client = openai.OpenAI(base_url=served.proxy(), api_key=user["token"], max_retries=0)
    for _ in range(10):
        try:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=5)
        except openai.APIStatusError as exc:
            refused = exc
            break
    else:
        raise AssertionError("a 30-token quota was never refused")
    fake_openai.reset()

    assert refused.status_code == 402 and "quota" in str(refused).lower()
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert fake_openai.requests == []
    assert user_of(served, user["token"])["token_counts"]["gpt-4o"] <= 30
    # Another family has no limit and still works.
    assert client.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices


def test_disabled_and_expired_users_are_refused_with_the_reason(served: Served, fake_openai: FakeOpenAI) -> None:
    disabled = new_user(served)
    admin(served).patch(f"/users/{disabled['token']}", json={"disabled": True, "disabled_reason": "took a break"})
    expired = new_user(served, type="temporary", expires_at=time.time() + 0.3)
    time.sleep(0.5)

    for token, reason in ((disabled["token"], "took a break"), (expired["token"], "expired")):
        client = openai.OpenAI(base_url=served.proxy(), api_key=token, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert reason in str(refused.value).lower()
    unknown = openai.OpenAI(base_url=served.proxy(), api_key="not-a-user-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unknown.models.list()
    assert not [r for r in fake_openai.requests if r.path.endswith("/chat/completions")]


def test_claude_refusals_come_in_anthropic_shape(proxy_app, fake_anthropic: FakeAnthropic) -> None:
    served = proxy_app(
        ANTHROPIC_KEY="sk-ant-paid-0123456789",
        ANTHROPIC_BASE_URL=fake_anthropic.base_url,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN,
    )
    user = new_user(served, token_limits={"claude-haiku": 1})
    body = {"model": "claude-3-5-haiku-20241022", "max_tokens": 50, "messages": HELLO}
    headers = {"x-api-key": user["token"], "anthropic-version": "2023-06-01"}

    first = httpx.post(f"{served.proxy('anthropic')}/messages", json=body, headers=headers)
    second = httpx.post(f"{served.proxy('anthropic')}/messages", json=body, headers=headers)

    assert first.status_code == 402  # the prompt alone is over a 1-token quota
    assert first.json()["type"] == "error"
    assert first.json()["error"]["type"] == "billing_error"
    assert "quota" in first.json()["error"]["message"].lower()
    assert second.status_code == 402
    assert fake_anthropic.requests == []


def test_per_user_rate_limit_answers_429_with_retry_after(proxy_app, fake_openai: FakeOpenAI) -> None:
    served = proxy_app(
        OPENAI_KEY=PAID,
        OPENAI_BASE_URL=fake_openai.base_url,
        GATEKEEPER="user_token",
        ADMIN_KEY=ADMIN,
        TEXT_MODEL_RATE_LIMIT="2",
    )
    user = new_user(served)
    headers = {"authorization": f"Bearer {user['token']}"}
    body = {"model": "gpt-4o", "messages": HELLO}
    replies = [httpx.post(f"{served.proxy()}/chat/completions", json=body, headers=headers) for _ in range(3)]

    assert [r.status_code for r in replies] == [200, 200, 429]
    assert replies[0].headers["x-ratelimit-limit"] == "2"
    assert replies[1].headers["x-ratelimit-remaining"] == "0"
    assert int(replies[2].headers["retry-after"]) >= 1
    assert replies[2].headers["x-ratelimit-limit"] == "2"
    assert replies[2].headers["x-ratelimit-remaining"] == "0"
    assert len([r for r in fake_openai.requests if r.path.endswith("/chat/completions")]) == 2


# --- A real process, killed with SIGKILL during traffic and started again on the same data ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_app(env: dict[str, str], port: int) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC", "PROXY", "ADMIN"))}
    full_env.update(env, PORT=str(port), HOST="127.0.0.1", CHECK_KEYS="false", LOG_LEVEL="warning")
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("app.py did not start within 60 s")


def test_users_and_counts_survive_sigkill_during_traffic(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    env = {
        "OPENAI_KEY": PAID,
        "OPENAI_BASE_URL": fake_openai.base_url,
        "GATEKEEPER": "user_token",
        "ADMIN_KEY": ADMIN,
        "DATA_DIR": str(tmp_path / "data"),
    }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_app(env, port)
    try:
        admin_api = httpx.Client(base_url=f"{url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})
        tokens = [admin_api.post("/users", json={"nickname": f"friend{i}"}).json()["token"] for i in range(3)]
        acknowledged: dict[str, int] = dict.fromkeys(tokens, 0)
        body = {"model": "gpt-4o", "messages": HELLO}
        for i in range(30):
            token = tokens[i % 3]
            reply = httpx.post(
                f"{url}/proxy/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
            )
            assert reply.status_code == 200
            acknowledged[token] += reply.json()["usage"]["total_tokens"]
        # Traffic still in flight when the process dies: a stream in progress.
        fake_openai.stream_delay = 0.2
        fake_openai.chunks = 50
        streaming = subprocess.Popen(
            [
                "curl", "-sN", "-X", "POST", f"{url}/proxy/openai/v1/chat/completions",
                "-H", f"authorization: Bearer {tokens[0]}", "-H", "content-type: application/json",
                "-d", json.dumps({**body, "stream": True}),
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        streaming.wait(10)
    finally:
        if process.poll() is None:
            process.kill()

    fake_openai.stream_delay = 0.0
    process = _start_app(env, port)
    try:
        admin_api = httpx.Client(base_url=f"{url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})
        users = {u["token"]: u for u in admin_api.get("/users").json()["users"]}
        assert set(users) == set(tokens)
        for token in tokens:
            assert users[token]["prompt_count"] == 10
            assert users[token]["token_counts"]["gpt-4o"] == acknowledged[token]
        usage = httpx.get(f"{url}/status").json()["usage"]
        assert usage["by_family"]["gpt-4o"]["requests"] == 30
        # And the restarted proxy serves those tokens.
        reply = httpx.post(
            f"{url}/proxy/openai/v1/chat/completions",
            json={"model": "gpt-4o", "messages": HELLO},
            headers={"authorization": f"Bearer {tokens[1]}"},
        )
        assert reply.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
