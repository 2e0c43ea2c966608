"""The fair queue: requests wait for a free key instead of failing, fairly between users, and
streaming clients see the wait (SSE comments, heartbeats) without their SDK noticing."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from proxy.access.queue import RequestQueue
from proxy.keys.pool import KeyPool
from tests.conftest import PAID, PROXY_KEY, Served
from tests.fakes import FakeOpenAI, KeyBehaviour, anthropic_error, openai_error

ADMIN = "admin-key-for-queue-tests"
CHAT = "/chat/completions"
HELLO = [{"role": "user", "content": "hello there"}]
LIMITED = "sk-limited-0123456789abcdef"
WINDOWED = "sk-windowed-0123456789abcdef"


def tee_transport(http: Any = httpx) -> Any:
    """An HTTP transport (of `httpx`, or of `httpx2` for the anthropic SDK) that keeps a copy of
    every byte of the replies in `.raw`, for an SDK client."""

    class Tee(http.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.raw = bytearray()

        def handle_request(self, request: Any) -> Any:
            response = super().handle_request(request)
            inner, raw = response.stream, self.raw

            class Copy(http.SyncByteStream):
                def __iter__(self) -> Iterator[bytes]:
                    for chunk in inner:
                        raw.extend(chunk)
                        yield chunk

                def close(self) -> None:
                    inner.close()

            return http.Response(
                response.status_code, headers=response.headers, stream=Copy(), extensions=response.extensions
            )

    return Tee()


Tee = Any


def sdk(served: Served, token: str = PROXY_KEY, timeout: float = 60) -> tuple[openai.OpenAI, Tee]:
    tee = tee_transport()
    http = httpx.Client(transport=tee, timeout=timeout, trust_env=False)
    return openai.OpenAI(base_url=served.proxy(), api_key=token, max_retries=0, http_client=http), tee


def new_user(served: Served, nickname: str, **fields: Any) -> str:
    reply = httpx.post(
        f"{served.url}/admin/api/users",
        json={"nickname": nickname, **fields},
        headers={"authorization": f"Bearer {ADMIN}"},
    )
    assert reply.status_code == 201, reply.text
    return reply.json()["token"]


def queue_of(served: Served, family: str = "gpt-4o", service: str = "openai") -> dict:
    return httpx.get(f"{served.url}/status").json()["queue"].get(service, {}).get(family, {"waiting": 0})


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def raw_stream(served: Served, payload: dict, token: str = PROXY_KEY, path: str = "/proxy/openai/v1/chat/completions"):
    """Start a streamed request over a raw socket; returns the socket (reply not read yet)."""
    host, port = served.url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before {marker!r}: {received!r}"
        received += chunk
    return received


@pytest.fixture
def limited() -> Iterator[FakeOpenAI]:
    """One key that is always rate-limited, for 30 s at a time."""
    with FakeOpenAI({LIMITED: KeyBehaviour("rate_limited", reset_s=30)}) as fake:
        yield fake


# Fair order (the queue alone, no server) -----------------------------------------------------------


def test_waiting_requests_go_round_robin_between_users_and_in_order_within_a_user() -> None:
    async def scenario() -> list[str]:
        pool = KeyPool("openai", ["sk-one-0123456789"], "oai-")
        pool.max_in_flight = 1
        queue = RequestQueue({"openai": pool}, timeout=30)
        holder = queue.ticket("openai", "gpt-4o", "zed", "gpt-4o")
        assert await queue.acquire(holder) is not None  # the only key is now busy
        served: list[str] = []
        tickets = {}

        async def ask(name: str) -> None:
            ticket = tickets[name] = queue.ticket("openai", "gpt-4o", name[0], "gpt-4o")
            await queue.acquire(ticket)
            served.append(name)

        tasks = []
        for name in ("A1", "A2", "A3", "B1", "C1", "C2"):  # A's burst arrives first
            tasks.append(asyncio.create_task(ask(name)))
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert queue.snapshot()["openai"]["gpt-4o"]["waiting"] == 6
        queue.done(holder)

        async def until(count: int) -> None:
            while len(served) < count:
                await asyncio.sleep(0.005)

        await until(1)
        # A1's key answered 429: A1 gives it back and asks again, from its own place in line.
        queue.release(tickets["A1"])
        await queue.acquire(tickets["A1"])
        served.append("A1 again")
        for count in range(3, 8):
            queue.done(tickets[served[-1].split()[0]])
            await until(count)
        await asyncio.gather(*tasks)
        return served

    order = asyncio.run(scenario())
    assert order[:2] == ["A1", "A1 again"]  # back at its own place, ahead of B1 and C1
    assert order[2:] == ["B1", "C1", "A2", "C2", "A3"]


# Many friends, one small key ---------------------------------------------------------------------


def test_ten_users_with_three_streams_each_on_a_key_allowing_two_per_two_seconds_all_succeed_fairly(
    proxy_app: Callable[..., Served],
) -> None:
    with FakeOpenAI({WINDOWED: KeyBehaviour("windowed", per_window=2, window_s=2.0)}) as fake:
        served = proxy_app(
            OPENAI_KEY=WINDOWED, OPENAI_BASE_URL=fake.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN,
            HEARTBEAT_INTERVAL="1",
        )  # fmt: skip
        tokens = [new_user(served, f"user{u}") for u in range(10)]
        clients = {(u, k): sdk(served, tokens[u]) for u in range(10) for k in range(3)}
        results: dict[tuple[int, int], Any] = {}
        primer, _ = sdk(served, new_user(served, "primer"))
        for _ in range(2):  # the key's window is full now, and the proxy knows it from the reply headers
            primer.chat.completions.create(model="gpt-4o", messages=HELLO)

        def ask(u: int, k: int) -> None:
            client, _ = clients[(u, k)]
            try:
                stream = client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": f"u{u} r{k}"}], stream=True
                )
                results[(u, k)] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            except Exception as exc:  # noqa: BLE001 - reported by the assertions below
                results[(u, k)] = exc

        threads = []
        for u in range(10):  # each user's burst arrives together, users one after another
            for k in range(3):
                thread = threading.Thread(target=ask, args=(u, k))
                thread.start()
                threads.append(thread)
                time.sleep(0.01)
            time.sleep(0.03)
        assert wait_until(lambda: queue_of(served)["waiting"] >= 20, 5)
        waiting = queue_of(served)
        assert waiting["estimated_wait_s"] > 0
        for thread in threads:
            thread.join(90)

        assert all(r == "tok0 tok1 tok2 tok3 tok4 " for r in results.values()), results  # no 429, no error
        assert len(results) == 30
        assert [r for r, (_, tee) in clients.items() if b": queued, position " not in tee.raw] == []
        users = [int(body["messages"][0]["content"].split()[0][1:]) for body in fake.admitted[2:]]
        assert len(users) == 30
        # Round-robin: every user's first request is served before anyone's second, and so on.
        assert [sorted(users[i : i + 10]) for i in (0, 10, 20)] == [list(range(10))] * 3, users

        def served_streams() -> list[dict]:
            return [e for e in served.runtime.ledger.recent(40) if e["status"] == 200 and e["streamed"]]

        assert wait_until(lambda: len(served_streams()) == 30)  # accounted as each stream's end is written
        assert max(e["queue_ms"] for e in served_streams()) > 10_000  # the ledger knows the waits


# Leaving, timing out, no queue --------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_leaves_while_queued_is_gone_from_the_queue_and_charged_nothing(
    proxy_app: Callable[..., Served], limited: FakeOpenAI, streamed: bool
) -> None:
    served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=limited.base_url, GATEKEEPER="user_token", ADMIN_KEY=ADMIN)
    token = new_user(served, "leaver", token_limits={"gpt-4o": 100_000})
    payload = {"model": "gpt-4o", "messages": HELLO, "stream": streamed}
    sock = raw_stream(served, payload, token)
    if streamed:
        assert b": queued, position 1, about " in read_until(sock, b": queued")
    assert wait_until(lambda: queue_of(served)["waiting"] == 1)
    status = queue_of(served)
    assert 20 <= status["estimated_wait_s"] <= 31  # the key's lockout: 30 s
    held = httpx.get(f"{served.url}/proxy/me", headers={"authorization": f"Bearer {token}"}).json()
    assert held["quota"]["gpt-4o"]["in_progress"] > 0
    sock.close()

    assert wait_until(lambda: queue_of(served)["waiting"] == 0)
    me = httpx.get(f"{served.url}/proxy/me", headers={"authorization": f"Bearer {token}"}).json()
    assert me["quota"]["gpt-4o"] == {"limit": 100_000, "used": 0, "in_progress": 0, "remaining": 100_000}
    user = httpx.get(f"{served.url}/admin/api/users/{token}", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert user["prompt_count"] == 0
    assert len(limited.requests) == 1  # the one 429 that sent it to the queue; nothing after
    assert wait_until(lambda: any(e["status"] == 499 for e in served.runtime.ledger.recent(5)))
    left = served.runtime.ledger.recent(1)[0]
    assert left["status"] == 499 and left["tokens_in"] == left["tokens_out"] == 0 and left["queue_ms"] > 0


def test_queue_timeout_answers_a_clear_429_after_the_wait(
    proxy_app: Callable[..., Served], limited: FakeOpenAI
) -> None:
    served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=limited.base_url, PROXY_KEY=PROXY_KEY, QUEUE_TIMEOUT="2")
    started = time.monotonic()
    reply = httpx.post(
        served.proxy() + CHAT,
        json={"model": "gpt-4o", "messages": HELLO},
        headers={"authorization": f"Bearer {PROXY_KEY}"},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    assert 1.8 <= elapsed < 4
    assert reply.status_code == 429
    assert reply.headers["x-should-retry"] == "false"
    error = reply.json()["error"]
    assert error["code"] == "queue_timeout" and error["type"] == "rate_limit_error"
    assert "Waited 2 s in the queue" in error["message"] and "QUEUE_TIMEOUT=2 s" in error["message"]
    assert served.runtime.ledger.recent(1)[0]["queue_ms"] >= 1800


def test_queue_timeout_ends_a_waiting_stream_with_an_error_event(
    proxy_app: Callable[..., Served], limited: FakeOpenAI
) -> None:
    served = proxy_app(
        OPENAI_KEY=LIMITED,
        OPENAI_BASE_URL=limited.base_url,
        PROXY_KEY=PROXY_KEY,
        QUEUE_TIMEOUT="2",
        HEARTBEAT_INTERVAL="0.5",
    )
    started = time.monotonic()
    with httpx.stream(
        "POST", served.proxy() + CHAT, json={"model": "gpt-4o", "messages": HELLO, "stream": True},
        headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10,
    ) as reply:  # fmt: skip
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert 1.8 <= time.monotonic() - started < 4
    assert lines[0].startswith(": queued, position 1, about ")
    assert sum(line.startswith(": queued") for line in lines) >= 3  # heartbeats every 0.5 s
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "queue_timeout" and "Waited 2 s in the queue" in error["message"]
    client, _ = sdk(served)
    with pytest.raises(openai.APIError, match="Waited 2 s in the queue"):
        list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))


@pytest.mark.parametrize("streamed", [False, True])
def test_queue_timeout_zero_keeps_the_immediate_429_with_retry_after(
    proxy_app: Callable[..., Served], limited: FakeOpenAI, streamed: bool
) -> None:
    served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=limited.base_url, PROXY_KEY=PROXY_KEY, QUEUE_TIMEOUT="0")
    for _ in range(2):  # the upstream's 429, then the key's lockout known to the pool
        started = time.monotonic()
        reply = httpx.post(
            served.proxy() + CHAT, json={"model": "gpt-4o", "messages": HELLO, "stream": streamed},
            headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10,
        )  # fmt: skip
        assert time.monotonic() - started < 1.5
        assert reply.status_code == 429 and reply.headers["content-type"].startswith("application/json")
        assert 20 <= int(reply.headers["retry-after"]) <= 30
        assert reply.json()["error"]["type"] == "rate_limit_error"
    assert len(limited.requests) == 1
    assert queue_of(served)["waiting"] == 0


def test_a_full_queue_answers_429_with_the_expected_wait(proxy_app: Callable[..., Served], limited: FakeOpenAI) -> None:
    served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=limited.base_url, PROXY_KEY=PROXY_KEY, MAX_QUEUE_LENGTH="1")
    first = raw_stream(served, {"model": "gpt-4o", "messages": HELLO, "stream": True})
    try:
        read_until(first, b": queued")
        reply = httpx.post(
            served.proxy() + CHAT,
            json={"model": "gpt-4o", "messages": HELLO},
            headers={"authorization": f"Bearer {PROXY_KEY}"},
        )
        assert reply.status_code == 429 and reply.json()["error"]["code"] == "queue_full"
        wait = int(reply.headers["retry-after"])
        assert 20 <= wait <= 31 and f"about {wait} s" in reply.json()["error"]["message"]
    finally:
        first.close()


# Streams kept alive -------------------------------------------------------------------------------


def test_a_reasoning_upstream_silent_for_25_seconds_is_kept_alive_with_heartbeats(
    proxy_app: Callable[..., Served],
) -> None:
    with FakeOpenAI({PAID: KeyBehaviour()}) as fake:
        fake.first_token_delay = 25
        served = proxy_app(OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY, HEARTBEAT_INTERVAL="1")
        client = httpx.Client(timeout=httpx.Timeout(10, read=3), trust_env=False)  # gives up after 3 s of silence
        arrivals: list[tuple[float, str]] = []
        started = time.monotonic()
        with client.stream(
            "POST", served.proxy() + CHAT, json={"model": "o3-mini", "messages": HELLO, "stream": True},
            headers={"authorization": f"Bearer {PROXY_KEY}"},
        ) as reply:  # fmt: skip
            for line in reply.iter_lines():
                if line:
                    arrivals.append((time.monotonic() - started, line))
    assert arrivals[-1][1] == "data: [DONE]" and arrivals[-1][0] >= 25
    beats = [t for t, line in arrivals if line == ": heartbeat"]
    assert len(beats) >= 20
    times = [0.0] + [t for t, _ in arrivals]
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 2.5


def test_a_stream_whose_upstream_is_slow_to_answer_gets_its_headers_and_heartbeats_at_once(
    proxy_app: Callable[..., Served],
) -> None:
    with FakeOpenAI({PAID: KeyBehaviour()}) as fake:
        fake.hang_first_byte = 4
        served = proxy_app(
            OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY, HEARTBEAT_INTERVAL="0.5"
        )
        client, tee = sdk(served, timeout=httpx.Timeout(10, read=2))  # type: ignore[arg-type]
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    assert tee.raw.count(b": waiting for the upstream\n\n") >= 5


# Waiting for the connection cap or a key's concurrency --------------------------------------------


@pytest.mark.parametrize("setting", ["UPSTREAM_MAX_CONNECTIONS", "KEY_MAX_CONCURRENCY"])
def test_requests_beyond_the_connection_cap_wait_in_line_with_a_comment(
    proxy_app: Callable[..., Served], setting: str
) -> None:
    with FakeOpenAI({PAID: KeyBehaviour()}, stream_delay=0.2) as fake:
        served = proxy_app(
            OPENAI_KEY=PAID,
            OPENAI_BASE_URL=fake.base_url,
            PROXY_KEY=PROXY_KEY,
            HEARTBEAT_INTERVAL="5",
            **{setting: "1"},
        )
        first = raw_stream(served, {"model": "gpt-4o", "messages": HELLO, "stream": True})
        try:
            read_until(first, b"data:")
            client, tee = sdk(served)
            started = time.monotonic()
            chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
            assert time.monotonic() - started > 0.6  # it waited for the first stream to end
        finally:
            first.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    assert b": queued, position 1, about " in tee.raw


# The Anthropic side ------------------------------------------------------------------------------


def test_the_anthropic_sdk_reads_a_queued_stream_and_a_queue_timeout_event(claude_pool) -> None:
    served, fake = claude_pool({"sk-ant-paid-0123456789": KeyBehaviour()}, HEARTBEAT_INTERVAL="0.3", QUEUE_TIMEOUT="3")
    fake.next_status.append((429, anthropic_error("rate_limit_error", "slow down"), {"retry-after": "1"}))
    tee = tee_transport(httpx2)
    client = anthropic.Anthropic(
        base_url=f"{served.url}/proxy/anthropic", api_key=PROXY_KEY, max_retries=0,
        http_client=httpx2.Client(transport=tee, timeout=30, trust_env=False),
    )  # fmt: skip
    with client.messages.stream(model="claude-3-5-haiku-20241022", max_tokens=50, messages=HELLO) as stream:
        text = stream.get_final_text()
    assert text and b": queued, position 1, about " in tee.raw
    assert b"event: message_stop" in tee.raw

    fake.next_status.append((429, anthropic_error("rate_limit_error", "slow down"), {"retry-after": "30"}))
    with (
        pytest.raises(anthropic.APIStatusError, match="Waited 3 s in the queue"),
        client.messages.stream(model="claude-3-5-haiku-20241022", max_tokens=50, messages=HELLO) as stream,
    ):
        stream.get_final_text()
    assert b"event: error\ndata: {" in tee.raw


def test_an_openai_stream_queued_behind_a_429_is_parsed_by_the_openai_sdk(proxy_app: Callable[..., Served]) -> None:
    with FakeOpenAI({PAID: KeyBehaviour()}) as fake:
        fake.next_status.append(
            (429, openai_error("Rate limit reached", "requests", "rate_limit_exceeded"), {"retry-after-ms": "800"})
        )
        served = proxy_app(
            OPENAI_KEY=PAID, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY, HEARTBEAT_INTERVAL="0.3"
        )
        client, tee = sdk(served)
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4 "
    assert tee.raw.startswith(b": queued, position 1, about 1 s\n\n")
    assert len(fake.requests) == 2  # the 429, then the same request again after the key's reset


# Shown to the owner ----------------------------------------------------------------------------------


def test_the_page_shows_each_familys_queue_next_to_its_keys_and_the_wait_of_each_request() -> None:
    from ui.keys import family_rows
    from ui.usage import EVENT_HEADERS, event_rows

    pool = {"by_family": {"gpt-4o": {"active": 1, "limited": 1, "revoked": 0}}}
    rows = family_rows(pool, {"gpt-4o": {"waiting": 3, "estimated_wait_s": 40.2}})
    assert rows == [["gpt-4o", 1, 1, 0, 3, "40s"]]
    event = {"time": 0, "service": "openai", "model": "gpt-4o", "latency_ms": 1500.0, "queue_ms": 1234.5, "status": 200}
    assert event_rows([event])[0][EVENT_HEADERS.index("Queued (ms)")] == 1234


# Seams with the refusal count and ERRORS_AS_CHAT ----------------------------------------------------


def test_a_client_that_leaves_the_line_is_counted_once_as_cancelled(
    proxy_app: Callable[..., Served], limited: FakeOpenAI
) -> None:
    served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=limited.base_url, PROXY_KEY=PROXY_KEY)
    sock = raw_stream(served, {"model": "gpt-4o", "messages": HELLO}, PROXY_KEY)
    assert wait_until(lambda: queue_of(served)["waiting"] == 1)
    sock.close()
    ledger = served.runtime.ledger
    assert wait_until(lambda: ledger.outcomes.get("cancelled", 0) >= 1)
    time.sleep(0.3)
    assert ledger.outcomes.get("cancelled") == 1 and len(ledger.recent(10)) == 1, ledger.outcomes


def test_a_queue_timeout_in_a_waiting_stream_is_counted_as_a_refusal_and_answered_as_chat(
    proxy_app: Callable[..., Served], limited: FakeOpenAI
) -> None:
    """The headers of a waiting stream are sent: the refusal is still counted with its reason (as
    without the wait), and with ERRORS_AS_CHAT it is chat text SillyTavern shows, not an error event."""
    served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=limited.base_url, PROXY_KEY=PROXY_KEY,
                       QUEUE_TIMEOUT="1", HEARTBEAT_INTERVAL="0.3", ERRORS_AS_CHAT="true")  # fmt: skip
    with httpx.stream(
        "POST", served.proxy() + CHAT, json={"model": "gpt-4o", "messages": HELLO, "stream": True},
        headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10,
    ) as reply:  # fmt: skip
        lines = [line for line in reply.iter_lines() if line]
    assert lines[0].startswith(": queued")
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in data if c.get("choices"))
    assert "Waited 1 s in the queue" in text and lines[-1] == "data: [DONE]"
    event = served.runtime.ledger.recent(1)[0]
    assert event["outcome"] == "refused: rate limit" and event["status"] == 429, event


# Several instances: the estimates count every instance's line ------------------------------------


def test_with_other_instances_waiting_the_estimate_counts_their_requests_and_their_pace() -> None:
    async def scenario() -> None:
        pool = KeyPool("openai", ["sk-one-0123456789"], "oai-")
        pool.max_in_flight = 1
        queue = RequestQueue({"openai": pool}, timeout=30)
        holder = queue.ticket("openai", "gpt-4o", "zed", "gpt-4o")
        assert await queue.acquire(holder) is not None  # the only key is busy
        mine = [queue.ticket("openai", "gpt-4o", f"u{i}", "gpt-4o") for i in range(2)]
        waiting = [asyncio.ensure_future(queue.acquire(t)) for t in mine]
        await asyncio.sleep(0)
        line = mine[0].line
        line.interval, line.last_grant = 4.0, queue.clock()  # this instance's line is served every 4 s
        alone = queue.estimate("openai", line, 3)
        assert alone == 12.0  # third in line, one every 4 s
        assert queue.snapshot()["openai"]["gpt-4o"] == {"waiting": 2, "estimated_wait_s": 12.0}

        # Another instance has 4 waiting on the same keys, served at 0.25 a second (every 4 s).
        queue.peers = {("openai", "gpt-4o"): (4, 0.25)}
        # A newcomer: 7th overall (2 here + 4 there + itself), served at 0.25 + 0.25 a second.
        assert queue.snapshot()["openai"]["gpt-4o"] == {"waiting": 6, "estimated_wait_s": 14.0}
        assert queue.wait_of(mine[0]) == (3, 6)  # first here: about third overall (1 + 4 * 1/2), 3 / 0.5 s
        assert queue.lines() == {("openai", "gpt-4o"): (2, 0.25)}  # what this instance tells the others
        for future in waiting:
            future.cancel()

    asyncio.run(scenario())


def test_a_request_that_leaves_the_line_while_the_database_is_down_never_reaches_the_upstream(
    proxy_app: Callable[..., Served],
) -> None:
    """It passed the check on arrival, then waited; when its key frees up the database is down
    (the disk refusing the usage): a 503 saying so, counted as such, and nothing sent upstream."""
    with FakeOpenAI({LIMITED: KeyBehaviour("rate_limited", reset_s=2)}) as fake:
        served = proxy_app(OPENAI_KEY=LIMITED, OPENAI_BASE_URL=fake.base_url, PROXY_KEY=PROXY_KEY, QUEUE_TIMEOUT="30")
        sock = raw_stream(served, {"model": "gpt-4o", "messages": HELLO, "stream": False})
        assert wait_until(lambda: queue_of(served)["waiting"] == 1)
        served.runtime.access.commits.failing = "usage could not be saved (OperationalError)"  # as a full disk
        reply = read_until(sock, b"}", timeout=15)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        assert b'"code":"dependency_unavailable"' in reply.replace(b" ", b"")
        assert len(fake.requests) == 1  # the 429 that sent it to the line; nothing after
        assert wait_until(lambda: served.runtime.ledger.outcomes.get("refused: dependency down") == 1)
