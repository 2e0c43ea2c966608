"""What the proxy must never do: reach a path off the allow-list, pass on a client's credential or
a redirecting field, follow a redirect or an environment proxy, or show a key to anyone."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeOpenAI, KeyBehaviour, openai_error

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
REVOKED = "sk-revoked-9876543210fedcba"
STRANGER = "sk-proj-StrangerKey0123456789abcdef"  # not configured here, but shaped like a key

ProxyApp = Callable[..., Served]


def raw_request(
    served: Served, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send `target` byte for byte (no client-side normalisation of `..`, `%2F` or `//`)."""
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, target, body=body, headers={**AUTH, "content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def proxy_client(served: Served, **headers: str) -> httpx.Client:
    """A plain HTTP client for the served proxy, ignoring any proxy settings of the environment."""
    return httpx.Client(base_url=served.proxy(), headers={**AUTH, **headers}, timeout=10, trust_env=False)


def assert_openai_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, Any]:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def everything_sent_back(response: httpx.Response) -> str:
    """All a client can read from a reply: status line, headers and body."""
    head = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    return f"{response.status_code}\n{head}\n\n{response.text}"




@pytest.fixture
def served(shared: tuple[FakeOpenAI, Served], fake: FakeOpenAI) -> Served:
    return shared[1]


# The allow-list -------------------------------------------------------------------------------

OFF_THE_LIST = [
    ("GET", "/proxy/openai/v1/files"),
    ("POST", "/proxy/openai/v1/files"),
    ("DELETE", "/proxy/openai/v1/files/file-abc"),
    ("POST", "/proxy/openai/v1/fine_tuning/jobs"),
    ("GET", "/proxy/openai/v1/fine_tuning/jobs"),
    ("POST", "/proxy/openai/v1/batches"),
    ("GET", "/proxy/openai/v1/batches"),
    ("POST", "/proxy/openai/v1/assistants"),
    ("POST", "/proxy/openai/v1/threads"),
    ("POST", "/proxy/openai/v1/threads/thread_1/runs"),
    ("GET", "/proxy/openai/v1/organization/users"),
    ("POST", "/proxy/openai/v1/organization/admin_api_keys"),
    ("GET", "/proxy/openai/v1/organization/costs"),
    ("POST", "/proxy/openai/v1/images/generations"),
    ("POST", "/proxy/openai/v1/audio/speech"),
    ("POST", "/proxy/openai/v1/audio/transcriptions"),
    ("POST", "/proxy/openai/v1/moderations"),
    ("GET", "/proxy/openai/v1/responses"),
    ("GET", "/proxy/openai/v1/responses/resp_abc123"),
    ("DELETE", "/proxy/openai/v1/responses/resp_abc123"),
    ("GET", "/proxy/openai/v1/responses/resp_abc123/input_items"),
    ("POST", "/proxy/openai/v1/responses/resp_abc123/cancel"),
    ("POST", "/proxy/openai/v1/responses/input_tokens"),
    ("POST", "/proxy/openai/v1/responses/compact"),
    ("POST", "/proxy/openai/v1/conversations"),
    ("GET", "/proxy/openai/v1/conversations/conv_1/items"),
    ("POST", "/proxy/openai/v1/models/gpt-4o"),
    ("GET", "/proxy/openai/v1/models/gpt-4o/x"),
    ("POST", "/proxy/openai/v1/v1/chat/completions"),
    ("POST", "/proxy/openai/v1/uploads"),
    ("GET", "/proxy/openai/v1/dashboard/billing/usage"),
    ("GET", "/proxy/openai/dashboard/billing/subscription"),
    ("DELETE", "/proxy/openai/v1/models/ft:gpt-4o-mini:org::abc123"),
    ("DELETE", "/proxy/openai/v1/models"),
    ("POST", "/proxy/openai/v1/models"),
    ("GET", "/proxy/openai/v1/chat/completions"),
    ("PUT", "/proxy/openai/v1/chat/completions"),
    ("PATCH", "/proxy/openai/v1/chat/completions"),
    ("DELETE", "/proxy/openai/v1/chat/completions"),
    ("GET", "/proxy/openai/v1/embeddings"),
    ("GET", "/proxy/openai/v1/completions"),
    ("POST", "/proxy/openai/v1/chat/completions/x"),
    ("POST", "/proxy/openai/v1/chat"),
    ("GET", "/proxy/openai/v2/models"),
    ("GET", "/proxy/openai/v1/v1/models"),
    ("GET", "/proxy/openai/v1"),
    ("GET", "/proxy/openai"),
    ("GET", "/proxy"),
    ("GET", "/proxy/elsewhere/v1/models"),
]

ENCODED_OR_DOTTED = [
    ("GET", "/proxy/openai/v1/%2e%2e/files"),
    ("GET", "/proxy/openai/v1/%2E%2E/files"),
    ("GET", "/proxy/openai/v1/..%2Ffiles"),
    ("GET", "/proxy/openai/v1/models%2F..%2F..%2Ffiles"),
    ("GET", "/proxy/openai/v1/../files"),
    ("GET", "/proxy/openai/v1/models/../files"),
    ("GET", "/proxy/openai/v1/./models"),
    ("GET", "/proxy/openai/./v1/models"),
    ("GET", "/proxy/openai/V1/models"),
    ("GET", "/proxy/openai/v1/Models"),
    ("GET", "/proxy/OpenAI/v1/models"),
    ("GET", "/proxy/openai/v1/%6dodels"),
    ("GET", "/proxy/openai/v1/models%00"),
    ("GET", "/proxy/openai/v1/models;x=1"),
    ("GET", "/proxy/openai/v1/models/.."),
    ("POST", "/proxy/openai/v1/chat%2Fcompletions"),
    ("POST", "/proxy/openai/v1/chat%2fcompletions"),
    ("POST", "/proxy/openai/v1/chat/./completions"),
    ("POST", "/proxy/openai/v1/chat/completions/../../files"),
    ("POST", "/proxy/openai/v1/chat\\completions"),
    ("POST", "/proxy/openai/v1/chat/completions%20"),
    ("POST", "/proxy/openai/v1/embeddings/%2e%2e/moderations"),
]


@pytest.mark.parametrize(("method", "target"), OFF_THE_LIST + ENCODED_OR_DOTTED)
def test_anything_off_the_allow_list_gets_404_in_openai_shape_and_reaches_no_upstream(
    served: Served, fake: FakeOpenAI, method: str, target: str
) -> None:
    body = json.dumps(CHAT).encode() if method != "GET" else None
    status, headers, reply = raw_request(served, method, target, body)
    error = assert_openai_error(status, headers, reply, 404)
    assert error["type"] == "invalid_request_error"
    assert "not available through this proxy" in error["message"]
    assert fake.requests == []


def test_an_allowed_request_after_refused_ones_still_reaches_only_the_allowed_endpoint(
    served: Served, fake: FakeOpenAI
) -> None:
    for method, target in ENCODED_OR_DOTTED:
        raw_request(served, method, target, json.dumps(CHAT).encode())
    status, _, _ = raw_request(served, "POST", "/proxy/openai/v1/chat/completions", json.dumps(CHAT).encode())
    assert status == 200
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/v1/chat/completions")]


# What goes upstream ---------------------------------------------------------------------------

CLIENT_SECRETS = {
    "x-api-key": "client-x-api-key-secret",
    "cookie": "session=client-cookie-secret",
    "x-forwarded-for": "203.0.113.9",
    "x-real-ip": "203.0.113.10",
    "forwarded": "for=203.0.113.11",
    "openai-organization": "org-client-organization",
    "openai-project": "proj_client_project",
    "x-custom-header": "client-custom-value",
    "x-stainless-os": "client-os-value",
    "user-agent": "client-agent/1.0",
    "origin": "https://client-origin.example",
    "referer": "https://client-referer.example/page",
}
UPSTREAM_MAY_SEE = {
    "host",
    "accept",
    "accept-encoding",
    "content-type",
    "content-length",
    "authorization",
    "user-agent",
}


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/chat/completions", CHAT),
        ("/chat/completions", {**CHAT, "stream": True}),
        ("/completions", {"model": "gpt-4o", "prompt": "hi"}),
        ("/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    ],
    ids=["chat", "chat-stream", "completions", "embeddings"],
)
def test_client_credentials_and_identifying_headers_never_reach_the_upstream(
    served: Served, fake: FakeOpenAI, path: str, payload: dict
) -> None:
    with proxy_client(served, **CLIENT_SECRETS) as client:
        response = client.post(path, json={**payload, "api_key": PROXY_KEY})
        assert response.status_code == 200
        response.read()
    [seen] = fake.requests
    assert seen.headers["authorization"] == f"Bearer {PAID}"
    assert set(seen.headers) <= UPSTREAM_MAY_SEE
    sent = json.dumps(seen.headers) + seen.body.decode()
    for secret in (PROXY_KEY, *CLIENT_SECRETS.values()):
        assert secret not in sent


def test_the_upstream_model_list_is_fetched_with_the_pool_key_only(
    proxy_app: ProxyApp, fake_openai: FakeOpenAI
) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, PROXY_KEY=PROXY_KEY)
    with proxy_client(served, **CLIENT_SECRETS) as client:
        assert client.get("/models").status_code == 200
    [seen] = fake_openai.requests
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert seen.headers["authorization"] == f"Bearer {PAID}"
    assert set(seen.headers) <= UPSTREAM_MAY_SEE
    for secret in (PROXY_KEY, *CLIENT_SECRETS.values()):
        assert secret not in json.dumps(seen.headers)


def test_body_fields_that_could_redirect_a_request_are_dropped_at_the_top_level_only(
    served: Served, fake: FakeOpenAI
) -> None:
    """Issue 9.16: an upstream (or a library in front of one) reads such fields at the top level
    only; deeper down they are the conversation's own data and travel exactly as sent."""
    evil = "http://evil.example/v1"
    message = {"role": "user", "content": "hello there", "api_base": evil, "extra_headers": {"x-evil": "1"}}
    metadata = {"base_url": evil, "note": {"user_config": {"x": 1}, "keep": "me"}}
    payload = {
        "model": "gpt-4o",
        "messages": [message],
        "api_base": evil,
        "base_url": evil,
        "user_config": {"api_key": "sk-attacker-0123456789"},
        "extra_headers": {"Authorization": "Bearer sk-attacker-0123456789"},
        "metadata": metadata,
    }
    with proxy_client(served) as client:
        assert client.post("/chat/completions", json=payload).status_code == 200
    [seen] = fake.requests
    assert not set(seen.json) & {"api_base", "base_url", "user_config", "extra_headers"}
    assert "attacker" not in seen.body.decode()
    assert seen.json["messages"] == [message]
    assert seen.json["metadata"] == metadata


def test_a_tool_parameter_named_like_a_redirecting_field_is_kept(served: Served, fake: FakeOpenAI) -> None:
    parameters = {
        "type": "object",
        "properties": {"base_url": {"type": "string"}, "api_base": {"type": "string"}},
        "required": ["base_url"],
    }
    tools = [{"type": "function", "function": {"name": "fetch", "parameters": parameters}}]
    with proxy_client(served) as client:
        assert client.post("/chat/completions", json={**CHAT, "tools": tools}).status_code == 200
    assert fake.requests[0].json["tools"] == tools


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_cookies_and_organization_headers_never_reach_the_client(served: Served, stream: bool) -> None:
    with proxy_client(served) as client:
        replies = [
            client.post("/chat/completions", json={**CHAT, "stream": stream}),
            client.post("/embeddings", json={"model": "text-embedding-3-small", "input": "hi"}),
            client.get("/models"),
        ]
    for response in replies:
        assert response.status_code == 200
        for name in ("set-cookie", "openai-organization", "openai-version"):
            assert name not in response.headers
        assert "org-secret" not in everything_sent_back(response)


def test_upstream_headers_on_an_error_reply_never_reach_the_client(served: Served, fake: FakeOpenAI) -> None:
    fake.next_status.append((400, openai_error("Bad request", "invalid_request_error")))
    with proxy_client(served) as client:
        response = client.post("/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert "set-cookie" not in response.headers and "openai-organization" not in response.headers


class RedirectingOpenAI(FakeOpenAI):
    """An upstream that answers every request with a redirect to `target`."""

    def __init__(self, status: int, target: str) -> None:
        super().__init__({PAID: KeyBehaviour()})
        self.redirect_status, self.target = status, target

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        location = self.target + request.path
        return web.json_response({"moved": location}, status=self.redirect_status, headers={"Location": location})


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_upstream_redirect_is_not_followed_and_the_client_gets_an_error(
    proxy_app: ProxyApp, status: int, stream: bool
) -> None:
    with FakeOpenAI({PAID: KeyBehaviour()}) as target, RedirectingOpenAI(status, target.url) as redirecting:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=redirecting.base_url)
        with proxy_client(served) as client:
            response = client.post("/chat/completions", json={**CHAT, "stream": stream})
        assert len(redirecting.requests) == 1
        assert target.requests == []
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "redirect" in response.json()["error"]["message"].lower()
    assert "location" not in response.headers


class ConnectionRecorder:
    """A TCP listener that counts connections, standing in for an HTTP proxy from the environment."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_proxy_settings_of_the_environment_are_not_used_for_the_upstream(
    proxy_app: ProxyApp, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = ConnectionRecorder()
    try:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.setenv(name, recorder.url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url)
        with proxy_client(served) as client:
            assert client.post("/chat/completions", json=CHAT).status_code == 200
            assert client.post("/chat/completions", json={**CHAT, "stream": True}).status_code == 200
            assert client.get("/models").status_code == 200
        assert len(fake_openai.requests) == 3
        assert recorder.connections == 0
    finally:
        recorder.close()


# Secrets in replies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, f"Invalid request from key {PAID}."),
        (400, f"Your key {STRANGER} was rejected."),
        (422, f"Echo: {PAID[:-1]}{PAID[-1]} and again {PAID}"),
        (500, f"Internal error for {PAID}"),
    ],
    ids=["configured-key", "any-sk-token", "repeated", "server-error"],
)
def test_upstream_errors_keep_status_and_shape_but_never_show_a_key(
    served: Served, fake: FakeOpenAI, status: int, message: str
) -> None:
    upstream = openai_error(message, "invalid_request_error", "bad", None)
    fake.next_status.extend([(status, upstream)] * 3)
    with proxy_client(served) as client:
        response = client.post("/chat/completions", json=CHAT)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "[redacted]" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "bad"
    shown = everything_sent_back(response)
    assert PAID not in shown and STRANGER not in shown and "sk-" not in shown


class PlainTextErrorOpenAI(FakeOpenAI):
    """An OpenAI-compatible server whose errors are plain text, echoing the key it was sent."""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("authorization", "")
        return web.Response(status=400, text=f"bad request; you sent {key}", content_type="text/plain")


def test_a_plain_text_upstream_error_is_shown_in_openai_shape_without_the_key(proxy_app: ProxyApp) -> None:
    with PlainTextErrorOpenAI({PAID: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url)
        with proxy_client(served) as client:
            response = client.post("/chat/completions", json=CHAT)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "bad request" in error["message"] and "[redacted]" in error["message"]
    assert PAID not in everything_sent_back(response)


def test_a_revoked_key_is_never_shown_to_the_client(proxy_app: ProxyApp) -> None:
    with FakeOpenAI({REVOKED: KeyBehaviour("revoked"), PAID: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=f"{REVOKED},{PAID}", OPENAI_BASE_URL=fake.base_url)
        replies = []
        with proxy_client(served) as client:
            for _ in range(2):
                replies.append(client.post("/chat/completions", json=CHAT))
                replies.append(client.post("/chat/completions", json={**CHAT, "stream": True}))
                replies.append(client.post("/completions", json={"model": "gpt-4o", "prompt": "hi"}))
                replies.append(client.post("/embeddings", json={"model": "text-embedding-3-small", "input": "x"}))
                replies.append(client.get("/models"))
            replies.append(client.get(f"{served.url}/status"))
        assert fake.calls_by_key.get(REVOKED, 0) >= 1  # the fake did echo it at least once
    assert [r.status_code for r in replies] == [200] * len(replies)
    for response in replies:
        shown = everything_sent_back(response)
        assert REVOKED not in shown and PAID not in shown


def test_when_every_key_is_revoked_the_client_is_told_so_without_seeing_one(proxy_app: ProxyApp) -> None:
    with FakeOpenAI({REVOKED: KeyBehaviour("revoked")}) as fake:
        served = proxy_app(OPENAI_KEY=REVOKED, OPENAI_BASE_URL=fake.base_url)
        with proxy_client(served) as client:
            first = client.post("/chat/completions", json=CHAT)
            second = client.post("/chat/completions", json=CHAT)
        assert len(fake.requests) == 1  # a revoked key is not tried again
    for response in (first, second):
        assert response.status_code >= 400
        assert "revoked" in response.json()["error"]["message"]
        assert REVOKED not in everything_sent_back(response)


# Secrets in logs ----------------------------------------------------------------------------


def test_no_log_line_ever_holds_a_key_the_proxy_key_or_a_client_credential(
    proxy_app: ProxyApp, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "pk-client-wrong-credential-77"
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI({REVOKED: KeyBehaviour("revoked"), PAID: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=f"{REVOKED},{PAID}", OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY)
        with proxy_client(served) as client:
            client.get("/models")
            client.post("/chat/completions", json=CHAT)
            client.post("/chat/completions", json={**CHAT, "stream": True})
            client.post("/embeddings", json={"model": "text-embedding-3-small", "input": "x"})
            client.post("/chat/completions", json=CHAT, headers={"authorization": f"Bearer {wrong}"})
            client.post("/chat/completions", json=CHAT, headers={"authorization": "", "x-api-key": wrong})
            client.post("/chat/completions", json=CHAT, headers={"authorization": "", "x-api-key": PROXY_KEY})
            client.post("/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
            client.post("/files", json={"purpose": "batch"})
            fake.next_status.extend([(500, openai_error(f"broken for {PAID}", "server_error"))] * 3)
            client.post("/chat/completions", json=CHAT)
            fake.drop_mid_stream = True
            client.post("/chat/completions", json={**CHAT, "stream": True})
            fake.drop_mid_stream = False
            fake.next_status.append((400, openai_error(f"client error for {PAID}", "invalid_request_error")))
            client.post("/chat/completions", json=CHAT)
    unreachable = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL="http://127.0.0.1:9/v1", PROXY_KEY=PROXY_KEY)
    with proxy_client(unreachable) as client:
        client.post("/chat/completions", json=CHAT)

    lines = [record.getMessage() for record in caplog.records]
    lines += [record.exc_text or "" for record in caplog.records]
    assert any("/chat/completions" in line for line in lines), "the per-request log lines were not captured"
    logged = "\n".join(lines) + caplog.text
    for secret in (PAID, REVOKED, PROXY_KEY, wrong):
        assert secret not in logged


class EchoingOpenAI(FakeOpenAI):
    """An OpenAI-compatible server that answers 200 with the key it was sent, in the body and a header."""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        escaped = "".join(f"\\u{ord(c):04x}" for c in key)
        reply = {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"your key is {key}"}}],
            "note": "ESCAPED",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1},
        }
        body = json.dumps(reply).replace("ESCAPED", escaped)
        return web.Response(text=body, content_type="application/json", headers={"x-request-id": f"req-{key}"})


def test_a_successful_reply_that_echoes_a_key_of_any_shape_is_redacted(proxy_app) -> None:
    key = "local-llm-token-7f3a9c1e5b2d"
    with EchoingOpenAI({key: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=key, OPENAI_BASE_URL=fake.base_url)
        chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(f"{served.proxy()}/chat/completions", json=chat)
    assert reply.status_code == 200
    assert key not in reply.text
    assert key not in json.dumps(reply.json())  # the \u-escaped copy decodes to the key: it must be gone too
    assert key not in reply.headers.get("x-request-id", "")
    assert reply.json()["usage"] == {"prompt_tokens": 1, "completion_tokens": 1}
