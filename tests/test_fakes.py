"""The fake upstreams behave like the real OpenAI and Anthropic APIs where the proxy cares."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour, format_reset

OPENAI_KEYS = {
    "sk-paid": KeyBehaviour(),
    "sk-trial": KeyBehaviour(kind="trial"),
    "sk-revoked": KeyBehaviour(kind="revoked"),
    "sk-quota": KeyBehaviour(kind="over_quota"),
    "sk-limited": KeyBehaviour(kind="rate_limited"),
    "sk-slow": KeyBehaviour(kind="slow_rate_limited"),
    "sk-flaky": KeyBehaviour(kind="flaky"),
    "sk-broken": KeyBehaviour(kind="server_error"),
    "sk-mini": KeyBehaviour(models=["gpt-4o-mini"]),
}
ANTHROPIC_KEYS = {
    "sk-ant-paid": KeyBehaviour(),
    "sk-ant-trial": KeyBehaviour(kind="trial"),
    "sk-ant-revoked": KeyBehaviour(kind="revoked"),
    "sk-ant-quota": KeyBehaviour(kind="over_quota"),
    "sk-ant-limited": KeyBehaviour(kind="rate_limited"),
    "sk-ant-flaky": KeyBehaviour(kind="flaky"),
    "sk-ant-broken": KeyBehaviour(kind="server_error"),
}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    """A running fake OpenAI with one key of each kind."""
    with FakeOpenAI(dict(OPENAI_KEYS)) as fake:
        yield fake


@pytest.fixture
def anthropic() -> Iterator[FakeAnthropic]:
    """A running fake Anthropic with one key of each kind."""
    with FakeAnthropic(dict(ANTHROPIC_KEYS)) as fake:
        yield fake


def oai(fake: FakeOpenAI, key: str) -> httpx.Client:
    """An httpx client speaking to the fake OpenAI with ``key``."""
    return httpx.Client(base_url=fake.base_url, headers={"authorization": f"Bearer {key}"}, timeout=5)


def ant(fake: FakeAnthropic, key: str, **headers: str) -> httpx.Client:
    """An httpx client speaking to the fake Anthropic with ``key``."""
    base = {"x-api-key": key, "anthropic-version": "2023-06-01", **headers}
    return httpx.Client(base_url=fake.base_url, headers=base, timeout=5)


def message(**extra: Any) -> dict[str, Any]:
    """A minimal Anthropic messages request."""
    return {
        "model": "claude-3-5-haiku-20241022",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello there"}],
        **extra,
    }


def data_events(text: str) -> list[Any]:
    """The ``data:`` payloads of an OpenAI stream, JSON-decoded except ``[DONE]``."""
    payloads = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def named_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs of an Anthropic stream."""
    pairs = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        pairs.append((lines["event"], json.loads(lines["data"])))
    return pairs


# -- OpenAI ----------------------------------------------------------------------------------


def test_models_lists_key_models_with_rate_limit_headers(openai: FakeOpenAI) -> None:
    """Paid and trial keys differ only in their advertised limits."""
    with oai(openai, "sk-paid") as client:
        r = client.get("/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == FakeOpenAI.DEFAULT_MODELS
    assert r.headers["x-ratelimit-limit-requests"] == "5000"
    assert {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests"} <= set(r.headers)
    with oai(openai, "sk-trial") as client:
        r = client.get("/models")
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-limit-tokens"] == "40000"
    with oai(openai, "sk-mini") as client:
        assert [m["id"] for m in client.get("/models").json()["data"]] == ["gpt-4o-mini"]


@pytest.mark.parametrize("key", ["sk-revoked", "sk-unknown-123"])
def test_bad_key_is_401_echoing_the_full_key(openai: FakeOpenAI, key: str) -> None:
    """Revoked and unknown keys fail everywhere, and the message leaks the key."""
    with oai(openai, key) as client:
        for r in (client.get("/models"), client.post("/chat/completions", json=CHAT)):
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert key in r.json()["error"]["message"]


def test_over_quota_key_lists_models_but_cannot_generate(openai: FakeOpenAI) -> None:
    """Like OpenAI, quota exhaustion shows only on generation routes, whatever the body."""
    with oai(openai, "sk-quota") as client:
        assert client.get("/models").status_code == 200
        r = client.post("/chat/completions", content=b"not json")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize(
    ("key", "wait", "retry_after"),
    [("sk-limited", "20s", "20"), ("sk-slow", "1m30s", "90")],
)
def test_rate_limited_key_gets_429_with_reset_headers(
    openai: FakeOpenAI, key: str, wait: str, retry_after: str
) -> None:
    """Rate-limited keys say when to retry, in header and message."""
    with oai(openai, key) as client:
        assert client.get("/models").status_code == 200
        r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert f"try again in {wait}" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == retry_after
    assert r.headers["x-ratelimit-reset-requests"] == wait
    assert r.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (20, "20s"), (90, "1m30s"), (1.5, "1.5s")])
def test_format_reset_matches_openai_style(seconds: float, text: str) -> None:
    """Reset durations look like OpenAI's headers."""
    assert format_reset(seconds) == text


def test_flaky_key_alternates_and_broken_key_always_fails(openai: FakeOpenAI) -> None:
    """Flaky: ok, 500, ok, 500 per key; server_error: always 500."""
    with oai(openai, "sk-flaky") as client:
        codes = [client.post("/chat/completions", json=CHAT).status_code for _ in range(4)]
    assert codes == [200, 500, 200, 500]
    with oai(openai, "sk-broken") as client:
        r = client.post("/chat/completions", json=CHAT)
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error"
        assert client.get("/models").status_code == 200
    assert openai.calls_by_key["sk-flaky"] == 4
    openai.reset()
    assert openai.requests == [] and openai.calls_by_key == {}


def test_unknown_model_is_model_not_found(openai: FakeOpenAI) -> None:
    """A model outside the key's list is a 404 model_not_found."""
    with oai(openai, "sk-mini") as client:
        r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "`gpt-4o`" in r.json()["error"]["message"]


def test_chat_reply_is_deterministic_with_headers_to_strip(openai: FakeOpenAI) -> None:
    """Usage: prompt = words + 3 per message, completion = chunks."""
    body = {
        **CHAT,
        "messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"]],
    }
    with oai(openai, "sk-paid") as client:
        r = client.post("/chat/completions", json=body)
    assert r.status_code == 200
    reply = r.json()
    assert reply["choices"][0]["message"]["content"] == "Hello from fake gpt-4o"
    assert reply["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
    }
    assert r.headers["set-cookie"].startswith("upstream=1")
    assert r.headers["openai-organization"] == "org-secret"
    assert "x-request-id" in r.headers and "x-ratelimit-limit-requests" in r.headers
    recorded = openai.requests[-1]
    assert (recorded.method, recorded.path, recorded.key) == (
        "POST",
        "/v1/chat/completions",
        "sk-paid",
    )
    assert recorded.json == body and recorded.headers["authorization"] == "Bearer sk-paid"


def test_max_tokens_zero_is_400_with_rate_limit_headers(openai: FakeOpenAI) -> None:
    """A checker can probe a key without spending tokens."""
    with oai(openai, "sk-trial") as client:
        r = client.post("/chat/completions", json={**CHAT, "max_tokens": 0})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-ratelimit-limit-requests"] == "3"


def test_chat_stream_chunk_order_with_usage(openai: FakeOpenAI) -> None:
    """Role delta, one word per chunk, finish, usage chunk, [DONE]."""
    openai.chunks = 3
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with oai(openai, "sk-paid") as client:
        r = client.post("/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = data_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == [
        "tok0 ",
        "tok1 ",
        "tok2 ",
    ]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
    }


def test_chat_stream_without_usage_and_capped_by_max_tokens(openai: FakeOpenAI) -> None:
    """No usage chunk unless asked; max_tokens caps the chunks."""
    with oai(openai, "sk-paid") as client:
        r = client.post("/chat/completions", json={**CHAT, "stream": True, "max_tokens": 2})
    chunks = data_events(r.text)[:-1]
    assert len(chunks) == 4  # role, 2 words, finish
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_legacy_completions_and_embeddings(openai: FakeOpenAI) -> None:
    """Text completions (plain and streamed) and embeddings have their own shapes."""
    body = {"model": "gpt-3.5-turbo", "prompt": "say hi"}
    with oai(openai, "sk-paid") as client:
        plain = client.post("/completions", json=body).json()
        streamed = client.post(
            "/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        )
        emb = client.post(
            "/embeddings",
            json={"model": "text-embedding-3-small", "input": ["a b", "c"]},
        )
    assert plain["object"] == "text_completion" and plain["choices"][0]["text"]
    events = data_events(streamed.text)
    assert events[0]["choices"][0]["text"] == "tok0 " and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 5
    assert [d["index"] for d in emb.json()["data"]] == [0, 1]
    assert emb.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert "x-ratelimit-limit-tokens" in emb.headers


def test_unknown_path_is_404_but_recorded(openai: FakeOpenAI) -> None:
    """Tests can assert that forbidden paths never reached the upstream."""
    with oai(openai, "sk-paid") as client:
        r = client.post("/fine_tuning/jobs?x=1", json={})
    assert r.status_code == 404 and "error" in r.json()
    assert openai.requests[-1].path == "/v1/fine_tuning/jobs?x=1"


def test_next_status_forces_responses_in_order(openai: FakeOpenAI) -> None:
    """Queued statuses are served first, whatever the key."""
    openai.next_status = [
        (502, {"error": {"message": "bad gateway"}}),
        (429, {"error": {}}),
    ]
    with oai(openai, "sk-paid") as client:
        codes = [client.post("/chat/completions", json=CHAT).status_code for _ in range(3)]
    assert codes == [502, 429, 200]


def test_client_disconnect_is_counted_quickly(openai: FakeOpenAI) -> None:
    """A client leaving mid-stream shows in closed_early within a second, even between chunks."""
    openai.stream_delay = 0.5
    with (
        oai(openai, "sk-paid") as client,
        client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        pieces = r.iter_raw()  # keep a reference: dropping it closes the connection
        next(pieces)
        assert openai.open_streams == 1
        assert openai.closed_early == 0
    left = time.monotonic()
    assert openai.wait_for(lambda: openai.closed_early == 1, timeout=1)
    assert time.monotonic() - left < 1
    assert openai.wait_for(lambda: openai.open_streams == 0, timeout=1)


def test_drop_mid_stream_cuts_after_two_chunks(openai: FakeOpenAI) -> None:
    """The client sees two words, then a broken connection."""
    openai.drop_mid_stream = True
    received = b""
    body = {**CHAT, "stream": True}
    with (
        oai(openai, "sk-paid") as client,
        client.stream("POST", "/chat/completions", json=body) as r,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        for piece in r.iter_raw():
            received += piece
    assert b"tok1 " in received and b"tok2 " not in received
    assert openai.dropped == 1 and openai.closed_early == 0


def test_hang_first_byte_triggers_client_timeout(openai: FakeOpenAI) -> None:
    """Headers are held back for hang_first_byte seconds."""
    openai.hang_first_byte = 2
    with oai(openai, "sk-paid") as client, pytest.raises(httpx.ReadTimeout):
        client.get("/models", timeout=0.2)


def test_stop_is_quick_with_an_open_stream() -> None:
    """stop() returns within 2 s even while a slow stream is being written."""
    fake = FakeOpenAI({"sk-paid": KeyBehaviour()}, stream_delay=1).start()
    with (
        oai(fake, "sk-paid") as client,
        client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        pieces = r.iter_raw()  # keep a reference: dropping it closes the connection
        next(pieces)
        began = time.monotonic()
        fake.stop()
        assert time.monotonic() - began < 2


# -- Anthropic -------------------------------------------------------------------------------


def test_anthropic_message_and_recorded_headers(anthropic: FakeAnthropic) -> None:
    """A plain reply, with version and beta headers recorded for pass-through checks."""
    with ant(anthropic, "sk-ant-paid", **{"anthropic-beta": "tools-2024"}) as client:
        r = client.post("/messages", json=message(system="be brief"))
    assert r.status_code == 200
    reply = r.json()
    assert reply["content"] == [{"type": "text", "text": "Hello from fake claude"}]
    assert reply["stop_reason"] == "end_turn"
    assert reply["usage"] == {"input_tokens": 7, "output_tokens": 5}
    assert r.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert "anthropic-ratelimit-output-tokens-limit" in r.headers
    recorded = anthropic.requests[-1]
    assert recorded.key == "sk-ant-paid"
    assert recorded.headers["anthropic-version"] == "2023-06-01"
    assert recorded.headers["anthropic-beta"] == "tools-2024"


def test_anthropic_key_kinds(anthropic: FakeAnthropic) -> None:
    """Each kind fails the way Anthropic does."""

    def post(key: str) -> httpx.Response:
        with ant(anthropic, key) as client:
            return client.post("/messages", json=message())

    revoked = post("sk-ant-revoked")
    assert revoked.status_code == 401
    assert revoked.json()["error"]["type"] == "authentication_error"
    assert "sk-ant-revoked" in revoked.json()["error"]["message"]
    quota = post("sk-ant-quota")
    assert quota.status_code == 400 and "credit balance" in quota.json()["error"]["message"]
    limited = post("sk-ant-limited")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "20"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert post("sk-ant-broken").json()["error"]["type"] == "overloaded_error"
    assert [post("sk-ant-flaky").status_code for _ in range(3)] == [200, 529, 200]
    with ant(anthropic, "sk-ant-trial") as client:
        r = client.post("/messages", json=message())
    assert r.headers["anthropic-ratelimit-requests-limit"] == "5"


def test_anthropic_requires_version_and_known_model(anthropic: FakeAnthropic) -> None:
    """Missing anthropic-version is a 400; an unknown model a 404 not_found_error."""
    with httpx.Client(base_url=anthropic.base_url) as client:
        r = client.post("/messages", json=message(), headers={"authorization": "Bearer sk-ant-paid"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    with ant(anthropic, "sk-ant-paid") as client:
        r = client.post("/messages", json=message(model="claude-9"))
    assert r.status_code == 404
    assert r.json()["error"] == {
        "type": "not_found_error",
        "message": "model: claude-9",
    }


def test_anthropic_models_and_count_tokens(anthropic: FakeAnthropic) -> None:
    """Cheap checker routes."""
    with ant(anthropic, "sk-ant-paid") as client:
        models = client.get("/models").json()
        count = client.post("/messages/count_tokens", json=message())
    assert [m["id"] for m in models["data"]] == FakeAnthropic.DEFAULT_MODELS
    assert models["data"][0]["display_name"] == "Claude 3.5 Haiku"
    assert models["has_more"] is False and models["first_id"] == "claude-3-5-haiku-20241022"
    assert count.json() == {"input_tokens": 5}


def test_anthropic_stream_event_sequence(anthropic: FakeAnthropic) -> None:
    """message_start, block start, ping, deltas, block stop, message_delta, message_stop."""
    anthropic.chunks = 2
    with ant(anthropic, "sk-ant-paid") as client:
        r = client.post("/messages", json=message(stream=True))
    events = named_events(r.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(name == data["type"] for name, data in events)
    assert events[0][1]["message"]["usage"] == {"input_tokens": 5, "output_tokens": 1}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "tok0 "}
    assert events[6][1]["usage"] == {"output_tokens": 2}
    assert events[6][1]["delta"]["stop_reason"] == "end_turn"


def test_anthropic_tool_use_plain_and_streamed(anthropic: FakeAnthropic) -> None:
    """Asking about the weather with tools offered yields a tool_use block."""
    body = message(
        tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    with ant(anthropic, "sk-ant-paid") as client:
        plain = client.post("/messages", json=body).json()
        streamed = client.post("/messages", json={**body, "stream": True})
    assert plain["stop_reason"] == "tool_use"
    assert plain["content"] == [
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "get_weather",
            "input": {"city": "Paris"},
        }
    ]
    events = named_events(streamed.text)
    assert events[1][1]["content_block"]["type"] == "tool_use"
    pieces = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert len(pieces) > 1 and json.loads("".join(pieces)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_anthropic_disconnect_is_counted(anthropic: FakeAnthropic) -> None:
    """Disconnect detection works for the Anthropic fake too."""
    anthropic.stream_delay = 0.5
    with (
        ant(anthropic, "sk-ant-paid") as client,
        client.stream("POST", "/messages", json=message(stream=True)) as r,
    ):
        pieces = r.iter_raw()  # keep a reference: dropping it closes the connection
        next(pieces)
    assert anthropic.wait_for(lambda: anthropic.closed_early == 1, timeout=1)
    assert anthropic.open_streams == 0
