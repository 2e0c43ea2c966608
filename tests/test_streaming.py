"""Streams: relayed as they arrive, closed upstream when the client leaves, ended cleanly on a drop."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from proxy.sse import SSEParser
from tests.conftest import PAID, Served, shared_proxy
from tests.fakes import FakeOpenAI, KeyBehaviour, StreamEvent, sse_data

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello there"}], "stream": True}
COMPLETION = {"model": "gpt-4o", "prompt": "Say hello", "stream": True}

ProxyApp = Callable[..., Served]


SHARED_ENV: dict[str, str] = {}  # no proxy key for these


@pytest.fixture(scope="module", params=["httptools", "h11"], ids=["direct relay", "async relay"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FakeOpenAI, Served]]:
    """Every test here through both relays: uvicorn's httptools protocol takes the direct one
    (proxy/relay.py), any other server the async iteration."""
    yield from shared_proxy(request, tmp_path_factory, http=request.param)


@pytest.fixture
def served(shared: tuple[FakeOpenAI, Served], fake: FakeOpenAI) -> Served:
    return shared[1]


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.proxy(), timeout=10, trust_env=False) as c:
        yield c


def data_of(lines: list[str]) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded ('[DONE]' stays a string)."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stream_lines(client: httpx.Client, path: str, payload: dict) -> tuple[httpx.Response, list[str]]:
    with client.stream("POST", path, json=payload) as response:
        return response, list(response.iter_lines())


def open_stream(served: Served, payload: dict) -> socket.socket:
    """Start a streamed chat over a raw socket and return once its first event has arrived."""
    host, port = served.url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=5)
    head = (
        "POST /proxy/openai/v1/chat/completions HTTP/1.1\r\n"
        f"Host: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    received = b""
    while b"data:" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the stream ended before its first event: {received!r}"
        received += chunk
    return sock


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# Relaying as it arrives -----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "payload"), [("/chat/completions", CHAT), ("/completions", COMPLETION)])
def test_the_first_chunk_reaches_the_client_while_the_upstream_is_still_sending(
    client: httpx.Client, fake: FakeOpenAI, path: str, payload: dict
) -> None:
    fake.stream_delay, fake.chunks = 0.3, 3
    started = time.monotonic()
    arrivals: list[float] = []
    with client.stream("POST", path, json=payload) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)
    total = time.monotonic() - started
    assert total > 1.2  # the upstream took its time...
    assert arrivals[0] < 0.5  # ...but the first event did not wait for it
    assert arrivals[0] < total / 3
    assert all(later > earlier + 0.15 for earlier, later in zip(arrivals, arrivals[1:], strict=False))


@pytest.mark.parametrize(("path", "payload"), [("/chat/completions", CHAT), ("/completions", COMPLETION)])
def test_a_stream_is_served_as_uncached_server_sent_events(client: httpx.Client, path: str, payload: dict) -> None:
    response, lines = stream_lines(client, path, payload)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = data_of(lines)
    assert events[-1] == "[DONE]"
    assert len(events) >= 6


def test_chat_stream_text_arrives_whole_and_in_order(client: httpx.Client) -> None:
    _, lines = stream_lines(client, "/chat/completions", CHAT)
    chunks = [event for event in data_of(lines) if event != "[DONE]"]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_an_error_before_the_stream_starts_is_a_plain_json_error(client: httpx.Client, fake: FakeOpenAI) -> None:
    message = {"error": {"message": "Invalid 'n'", "type": "invalid_request_error", "param": "n", "code": None}}
    fake.next_status.append((400, message))
    response, lines = stream_lines(client, "/chat/completions", {**CHAT, "n": -1})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert json.loads("".join(lines)) == message


# The usage chunk ------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "payload"), [("/chat/completions", CHAT), ("/completions", COMPLETION)])
@pytest.mark.parametrize("options", [None, {"include_usage": False}], ids=["no-options", "usage-false"])
def test_the_usage_chunk_the_proxy_asked_for_is_hidden_from_a_client_that_did_not(
    client: httpx.Client, fake: FakeOpenAI, path: str, payload: dict, options: dict | None
) -> None:
    body = payload if options is None else {**payload, "stream_options": options}
    _, lines = stream_lines(client, path, body)
    assert fake.requests[0].json["stream_options"]["include_usage"] is True  # the proxy asked upstream
    chunks = [event for event in data_of(lines) if event != "[DONE]"]
    assert all(chunk["choices"] for chunk in chunks)
    assert not any(chunk.get("usage") for chunk in chunks)
    assert data_of(lines)[-1] == "[DONE]"


@pytest.mark.parametrize(("path", "payload"), [("/chat/completions", CHAT), ("/completions", COMPLETION)])
def test_the_usage_chunk_reaches_a_client_that_asked_for_it(client: httpx.Client, path: str, payload: dict) -> None:
    _, lines = stream_lines(client, path, {**payload, "stream_options": {"include_usage": True}})
    events = data_of(lines)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5


# Ending -------------------------------------------------------------------------------------


def test_a_client_that_leaves_mid_stream_closes_the_upstream_request_within_a_second(
    client: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.stream_delay = 0.3
    with client.stream("POST", "/chat/completions", json=CHAT) as response:
        lines = response.iter_lines()  # held, so the connection stays open until the block ends
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
        time.sleep(0.1)
        assert fake.open_streams == 1  # still streaming while the client is there
    left = time.monotonic()
    assert fake.wait_for(lambda: fake.closed_early == 1, timeout=1.0)
    assert fake.wait_for(lambda: fake.open_streams == 0, timeout=1.0)
    assert time.monotonic() - left < 1.0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_two_hundred_abandoned_streams_exhaust_nothing(served: Served, client: httpx.Client, fake: FakeOpenAI) -> None:
    fake.stream_delay = 0.2
    open_stream(served, CHAT).close()  # warm up: the proxy's connection pool and the fake exist
    assert fake.wait_for(lambda: fake.open_streams == 0, timeout=2.0)
    before = open_fds()
    for _ in range(200):
        open_stream(served, CHAT).close()
    assert fake.wait_for(lambda: fake.open_streams == 0, timeout=5.0)
    assert fake.wait_for(lambda: fake.closed_early == 201, timeout=5.0)
    assert fake.wait_for(lambda: open_fds() <= before + 10, timeout=5.0), (before, open_fds())

    fake.stream_delay = 0.0
    started = time.monotonic()
    assert client.post("/chat/completions", json={**CHAT, "stream": False}).status_code == 200
    _, lines = stream_lines(client, "/chat/completions", CHAT)
    assert data_of(lines)[-1] == "[DONE]"
    assert time.monotonic() - started < 1.0


def test_an_upstream_that_drops_mid_stream_ends_the_client_stream_with_an_error_event(
    client: httpx.Client, fake: FakeOpenAI
) -> None:
    fake.drop_mid_stream = True
    response, lines = stream_lines(client, "/chat/completions", CHAT)
    assert response.status_code == 200
    events = data_of(lines)
    assert fake.dropped == 1
    assert "[DONE]" not in events
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", "tok0 ", "tok1 "]
    error = events[-1]["error"]
    assert error["message"] and error["type"]
    assert fake.wait_for(lambda: fake.open_streams == 0, timeout=1.0)


def test_an_upstream_that_stalls_mid_stream_ends_the_client_stream_with_an_error_event(
    proxy_app: ProxyApp, fake_openai: FakeOpenAI
) -> None:
    served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake_openai.base_url, UPSTREAM_READ_TIMEOUT="0.3")
    fake_openai.stream_delay = 2.0
    started = time.monotonic()
    with httpx.Client(base_url=served.proxy(), timeout=10, trust_env=False) as client:
        response, lines = stream_lines(client, "/chat/completions", CHAT)
    assert response.status_code == 200
    assert time.monotonic() - started < 1.5
    events = data_of(lines)
    assert events[0]["object"] == "chat.completion.chunk"
    assert "error" in events[-1] and "[DONE]" not in events


class ErrorInStreamOpenAI(FakeOpenAI):
    """An upstream that reports an error inside its stream, echoing the key it was sent."""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]}
        error = {"error": {"message": f"Key {key} hit an internal error", "type": "server_error"}}
        events = [StreamEvent(sse_data(chunk), content=True), StreamEvent(sse_data(error))]
        return await self._stream(request, events, {})


@pytest.mark.parametrize("key", [PAID, "local-server-token-0123456789"], ids=["sk-key", "key-of-any-shape"])
def test_an_error_event_inside_the_stream_is_its_last_word_and_never_shows_a_key(proxy_app: ProxyApp, key: str) -> None:
    with ErrorInStreamOpenAI({key: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=key, OPENAI_BASE_URL=fake.base_url)
        with httpx.Client(base_url=served.proxy(), timeout=10, trust_env=False) as client:
            _, lines = stream_lines(client, "/chat/completions", CHAT)
    events = data_of(lines)
    assert events[0]["choices"][0]["delta"]["content"] == "hi"
    errors = [event for event in events if "error" in event]
    assert len(errors) == 1 and errors[0] is events[-1]
    assert "hit an internal error" in errors[0]["error"]["message"]
    assert key not in "\n".join(lines)


class LingeringOpenAI(FakeOpenAI):
    """An upstream that sends its whole stream, [DONE] included, then waits before closing."""

    async def _stream(self, request: web.Request, events, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event.data)
        await asyncio.sleep(1.0)
        await response.write_eof()
        return response


def test_a_client_that_leaves_after_the_last_event_was_served_not_aborted(proxy_app: ProxyApp) -> None:
    with LingeringOpenAI({PAID: KeyBehaviour()}) as fake:
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url)
        with (
            httpx.Client(base_url=served.proxy(), timeout=10, trust_env=False) as client,
            client.stream("POST", "/chat/completions", json=CHAT) as reply,
        ):
            for line in reply.iter_lines():
                if line == "data: [DONE]":
                    break  # like many clients: stop reading at [DONE] and hang up
        deadline = time.monotonic() + 3
        while not served.runtime.ledger.recent(1) and time.monotonic() < deadline:
            time.sleep(0.05)
    event = served.runtime.ledger.recent(1)[0]
    assert event["status"] == 200
    assert event["tokens_out"] == 5  # the upstream's own count, not an estimate


# Parsing what arrives ----------------------------------------------------------------------------

CRLF_STREAM = b'event: message_start\r\ndata: {"a": 1}\r\n\r\ndata: line1\r\ndata: line2\r\n\r\ndata: [DONE]\r\n\r\n'


@pytest.mark.parametrize("separator", [b"\r\n", b"\n", b"\r"], ids=["crlf", "lf", "cr"])
def test_events_are_parsed_the_same_wherever_the_network_splits_them(separator: bytes) -> None:
    stream = CRLF_STREAM.replace(b"\r\n", separator)
    expected = [("message_start", '{"a": 1}'), ("", "line1\nline2"), ("", "[DONE]")]
    for cut in range(1, len(stream)):
        parser = SSEParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:]) + parser.flush()
        assert [(e.event, e.data) for e in events] == expected, f"split after {stream[:cut][-8:]!r}"


def test_a_last_event_without_its_blank_line_is_still_delivered() -> None:
    parser = SSEParser()
    events = parser.feed(b"data: one\r\n\r\ndata: tail\r") + parser.flush()
    assert [e.data for e in events] == ["one", "tail"]
