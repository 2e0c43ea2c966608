"""Issue 9, items 13 and 14: every byte an upstream sent reaches the client, and a broken upstream
reply ends cleanly (an error event, a 502), never a 500, a silent cut or an unbounded buffer.

The upstream is tests/fakes.py's ScriptedUpstream: a real aiohttp server on loopback writing
exactly the broken replies below.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import PROXY_KEY, Served
from tests.fakes import ScriptedUpstream, sse_data, sse_event

ADMIN = "admin-key-for-tests-0001"
SONNET = "claude-sonnet-4-20250514"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True}
CLAUDE = {"model": SONNET, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "stream": True}
PIECES = [f"piece{i} " for i in range(6)]


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as upstream:
        yield upstream


@pytest.fixture
def proxy(proxy_app: Callable[..., Served], scripted: ScriptedUpstream) -> Callable[..., Served]:
    """A factory: the proxy in front of the scripted upstream, for both services."""

    def start(**env: str) -> Served:
        settings = {
            "OPENAI_KEY": "sk-paid-0123456789abcdef",
            "OPENAI_BASE_URL": scripted.base_url,
            "ANTHROPIC_KEY": "sk-ant-paid-0123456789",
            "ANTHROPIC_BASE_URL": scripted.base_url,
            "PROXY_KEY": PROXY_KEY,
            **env,
        }
        return proxy_app(**settings)

    return start


def openai_chunks(pieces: list[str]) -> list[bytes]:
    def chunk(delta: dict) -> bytes:
        return sse_data({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [
            {"index": 0, "delta": delta, "finish_reason": None}
        ]})  # fmt: skip

    return [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]


def claude_events(pieces: list[str]) -> list[bytes]:
    start = {"id": "msg_1", "type": "message", "role": "assistant", "model": SONNET, "content": [],
             "stop_reason": None, "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
    events = [
        sse_event({"type": "message_start", "message": start}),
        sse_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    events += [
        sse_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}})
        for p in pieces
    ]
    return events


def claude_finish(output_tokens: int = 6) -> list[bytes]:
    return [
        sse_event({"type": "content_block_stop", "index": 0}),
        sse_event(
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": output_tokens}}
        ),
        sse_event({"type": "message_stop"}),
    ]


def events_of(body: str) -> list[str]:
    """The data lines of an SSE body, in order."""
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


def texts_of(datas: list[str]) -> list[str]:
    """The text pieces in OpenAI chunks or Anthropic events."""
    out = []
    for data in datas:
        try:
            parsed = json.loads(data)
        except ValueError:
            continue
        choices = parsed.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if choice.get("delta", {}).get("content"):
                out.append(choice["delta"]["content"])
        if parsed.get("type") == "content_block_delta":
            out.append(parsed["delta"]["text"])
    return out


def stream_post(url: str, payload: dict, headers: dict[str, str] = AUTH) -> tuple[int, str]:
    with httpx.Client(timeout=10) as client, client.stream("POST", url, json=payload, headers=headers) as reply:
        return reply.status_code, "".join(reply.iter_text())


# 13. A stream cut by the upstream ------------------------------------------------------------------


ROUTES = {
    "openai": ("openai", "/chat/completions", CHAT, openai_chunks),
    "claude": ("anthropic", "/messages", CLAUDE, claude_events),
    "door": ("anthropic", "/chat/completions", {**CLAUDE, "max_tokens": None}, claude_events),
}


@pytest.mark.parametrize("route", ROUTES)
def test_a_stream_cut_by_the_upstream_delivers_every_chunk_sent_before_the_break(
    proxy: Callable[..., Served], scripted: ScriptedUpstream, route: str
) -> None:
    service, path, payload, events = ROUTES[route]
    served = proxy()
    scripted.reply = scripted.sse_then_cut(events(PIECES))
    payload = {k: v for k, v in payload.items() if v is not None}
    complete = 0
    for _ in range(30):
        status, body = stream_post(served.proxy(service) + path, payload)
        assert status == 200
        datas = events_of(body)
        assert "error" in json.loads(datas[-1]), body  # then one error event, the stream's last word
        complete += texts_of(datas) == PIECES
    assert complete == 30


def test_a_cut_stream_charges_the_tokens_that_reached_the_client(
    proxy: Callable[..., Served], scripted: ScriptedUpstream
) -> None:
    served = proxy(GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    admin = httpx.Client(base_url=f"{served.url}/admin/api", headers={"authorization": f"Bearer {ADMIN}"})
    token = admin.post("/users", json={"nickname": "carol"}).json()["token"]
    long_pieces = ["word " * 100] * 6  # 3,000 characters delivered
    scripted.reply = scripted.sse_then_cut(openai_chunks(long_pieces))
    status, body = stream_post(served.proxy() + "/chat/completions", CHAT, {"authorization": f"Bearer {token}"})
    assert status == 200 and texts_of(events_of(body)) == long_pieces
    counts = admin.get(f"/users/{token}").json()["token_counts"]
    assert counts.get("gpt-4o", 0) >= 3000 // 4  # at least the delivered text, ~4 characters a token


def test_a_break_after_the_last_event_adds_no_error(proxy: Callable[..., Served], scripted: ScriptedUpstream) -> None:
    served = proxy()
    scripted.reply = scripted.sse_then_cut(claude_events(PIECES) + claude_finish())
    status, body = stream_post(served.proxy("anthropic") + "/messages", CLAUDE)
    assert status == 200
    assert "error" not in body and json.loads(events_of(body)[-1])["type"] == "message_stop"


# 14. Broken upstream replies ----------------------------------------------------------------------


def test_a_malformed_chunk_ends_an_openai_stream_with_an_error_event(
    proxy: Callable[..., Served], scripted: ScriptedUpstream
) -> None:
    served = proxy()
    good = openai_chunks(PIECES)
    broken = [*good[:3], sse_data({"choices": 3, "content": "?"}), *good[3:], sse_data("[DONE]")]
    scripted.reply = scripted.sse_then_cut(broken, cut=False)
    status, body = stream_post(served.proxy() + "/chat/completions", CHAT)
    assert status == 200
    datas = events_of(body)
    assert texts_of(datas) == PIECES[:2]
    error = json.loads(datas[-1])["error"]
    assert "could not read" in error["message"]


def test_a_malformed_event_ends_a_translated_stream_with_an_error_chunk(
    proxy: Callable[..., Served], scripted: ScriptedUpstream
) -> None:
    served = proxy()
    events = claude_events(PIECES[:2])
    events.append(sse_event({"type": "content_block_delta", "index": 0, "delta": "oops"}))
    scripted.reply = scripted.sse_then_cut(events + claude_finish(), cut=False)
    payload = {k: v for k, v in CLAUDE.items() if k != "max_tokens"}
    status, body = stream_post(served.proxy("anthropic") + "/chat/completions", payload)
    assert status == 200
    datas = events_of(body)
    assert texts_of(datas) == PIECES[:2]
    assert json.loads(datas[-1])["error"]["type"] == "upstream_error"


@pytest.mark.parametrize("usage", [{"input_tokens": "many", "output_tokens": [3]}, "lots", {"input_tokens": 1e400}])
def test_a_non_numeric_usage_through_the_door_is_no_500(
    proxy: Callable[..., Served], scripted: ScriptedUpstream, usage: object
) -> None:
    served = proxy()
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": SONNET, "stop_reason": "end_turn",
               "content": [{"type": "text", "text": "fine"}], "usage": usage}  # fmt: skip
    scripted.reply = scripted.json(message)
    payload = {"model": SONNET, "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(served.proxy("anthropic") + "/chat/completions", json=payload, headers=AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "fine"
    native = httpx.post(served.proxy("anthropic") + "/messages", json={**payload, "max_tokens": 5}, headers=AUTH)
    assert native.status_code == 200 and native.json()["content"] == message["content"]


def test_a_reply_of_garbage_content_through_the_door_is_a_502_not_a_500(
    proxy: Callable[..., Served], scripted: ScriptedUpstream
) -> None:
    served = proxy()
    scripted.reply = scripted.json({"type": "message", "content": [5, "x", {"type": "tool_use", "input": 3}],
                                    "stop_reason": {"odd": 1}, "id": 9})  # fmt: skip
    payload = {"model": SONNET, "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(served.proxy("anthropic") + "/chat/completions", json=payload, headers=AUTH, timeout=10)
    assert reply.status_code in (200, 502), reply.text
    assert "error" not in reply.json() or reply.json()["error"]["type"] == "upstream_error"


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
def test_a_huge_non_streamed_reply_is_refused_with_a_502_not_held_whole(
    proxy: Callable[..., Served], scripted: ScriptedUpstream, declare_length: bool
) -> None:
    served = proxy(MAX_REPLY_BYTES="2000000")
    scripted.reply = scripted.huge(200 * 1024 * 1024, declare_length=declare_length)
    payload = {k: v for k, v in CHAT.items() if k != "stream"}
    reply = httpx.post(served.proxy() + "/chat/completions", json=payload, headers=AUTH, timeout=30)
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert "MAX_REPLY_BYTES" in error["message"] and error["type"] == "upstream_error"
    assert scripted.wait_for(lambda: scripted.bytes_sent < 64 * 1024 * 1024)
    assert scripted.bytes_sent < 64 * 1024 * 1024  # the proxy hung up long before 200 MB


def test_an_error_reply_full_of_key_prefixes_is_redacted_in_linear_time(
    proxy: Callable[..., Served], scripted: ScriptedUpstream
) -> None:
    """Item 1 (redaction walks): a digitless run "sk-sk-sk-..." used to cost a scan per "sk-"."""
    served = proxy()
    echoed = "sk-" * 60_000  # what a client wrote, echoed back by the upstream
    scripted.reply = scripted.json({"error": {"message": echoed, "type": "invalid_request_error"}}, status=400)
    payload = {k: v for k, v in CHAT.items() if k != "stream"}
    started = time.perf_counter()
    reply = httpx.post(served.proxy() + "/chat/completions", json=payload, headers=AUTH, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == echoed  # a word, not a key: passed on as it was
    assert time.perf_counter() - started < 2.0
