"""The stream relay itself, on real sockets: heartbeats between whole events, no byte lost, a client
that leaves still cancels the upstream, however the upstream's bytes are cut."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.client import ClientGone
from proxy.errors import MARK, Redactor
from proxy.keepalive import HEARTBEAT, Silence
from proxy.providers.openai.dialect import OpenAIStreamMeter
from proxy.relay import DirectRelay
from proxy.sse import encode
from proxy.upstream import EventRelay, relay_events

KEY = "sk-relay-test-0123456789abcdefghij"
CLOSED = web.AppKey("closed", asyncio.Event)  # set when the proxy hung up on the upstream


def chunk_event(text: str) -> bytes:
    return encode({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = encode(
    {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
)


async def scripted_upstream(script: list[bytes | float]) -> tuple[web.AppRunner, str]:
    """A loopback SSE upstream that writes the bytes of `script` and sleeps for its floats."""
    closed = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        for step in script:
            if isinstance(step, float):
                until = loop.time() + step
                while loop.time() < until:  # silent, watching for the proxy to hang up
                    if request.transport is None or request.transport.is_closing():
                        closed.set()
                        return response
                    await asyncio.sleep(0.01)
            else:
                await response.write(step)
        return response

    app = web.Application()
    app.router.add_post("/stream", handler)
    app[CLOSED] = closed
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/stream"


class RecordingClient:
    """The client's side of DirectRelay (proxy/relay.py's ClientStream): what it is sent, one
    entry per write, as a client reads the relay's chunks; `paused` as a full socket."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.gone = False
        self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()

    def write(self, data: bytes) -> None:
        assert not self.gone
        self.chunks.append(data)

    async def drain(self) -> None:
        await self.writable.wait()


class Hangup:
    """The ASGI `receive` of a relayed stream: http.disconnect once `leave()` is called."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    def leave(self) -> None:
        self.left.set()

    async def __call__(self) -> dict:
        await self.left.wait()
        return {"type": "http.disconnect"}


@pytest.fixture(params=["async", "direct"])
def driver(request: pytest.FixtureRequest) -> str:
    """Both relays: the async iteration (any ASGI server) and the callbacks (under uvicorn)."""
    return request.param


async def relay_with(driver: str, response: aiohttp.ClientResponse, relay: EventRelay, heartbeat: float) -> list[bytes]:
    if driver == "async":
        return [chunk async for chunk in relay_events(response, relay, heartbeat=heartbeat)]
    assert DirectRelay.supports(response)
    client = RecordingClient()
    await DirectRelay(response, relay, client, heartbeat).run(Hangup())  # type: ignore[arg-type]
    return client.chunks


async def relayed(
    script: list[bytes | float], heartbeat: float, redact: Redactor | None = None, read_timeout: float | None = None,
    driver: str = "async",
) -> list[bytes]:  # fmt: skip
    """Every chunk the relay hands to the client for an upstream playing `script`."""
    runner, url = await scripted_upstream(script)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.post(url) as response:
            meter = OpenAIStreamMeter(client_wants_usage=True)
            relay = EventRelay(
                meter, None, lambda message: encode({"error": message}), redact=redact or Redactor([KEY])
            )
            return await relay_with(driver, response, relay, heartbeat)
    finally:
        await runner.cleanup()


def events_of(chunks: list[bytes]) -> bytes:
    return b"".join(chunk for chunk in chunks if chunk != HEARTBEAT)


async def test_a_silent_upstream_gets_heartbeats_between_whole_events_and_loses_no_byte(driver: str) -> None:
    first, second = chunk_event("one"), chunk_event("two")
    half = len(second) // 2
    # Silent after a whole event, then silent again with half an event sent: the comment must
    # wait for neither, and must never land inside the half-sent event.
    script: list[bytes | float] = [first, 0.35, second[:half], 0.35, second[half:], USAGE, b"data: [DONE]\n\n"]
    chunks = await relayed(script, heartbeat=0.1, driver=driver)
    assert events_of(chunks) == first + second + USAGE + b"data: [DONE]\n\n"
    assert chunks.count(HEARTBEAT) >= 4
    for chunk in chunks:  # each chunk is a heartbeat or whole events: a comment never splits one
        assert chunk == HEARTBEAT or chunk.endswith(b"\n\n") and chunk.startswith(b"data: ")
    beat_at = [i for i, chunk in enumerate(chunks) if chunk == HEARTBEAT]
    came = next(i for i, chunk in enumerate(chunks) if chunk.startswith(second))
    assert came > beat_at[-1]  # the half event came whole, after the silence


async def test_no_heartbeat_while_the_upstream_keeps_talking(driver: str) -> None:
    script: list[bytes | float] = []
    for i in range(20):
        script += [chunk_event(f"t{i}"), 0.02]
    chunks = await relayed([*script, USAGE, b"data: [DONE]\n\n"], heartbeat=0.15, driver=driver)
    assert HEARTBEAT not in chunks
    assert events_of(chunks).count(b"chat.completion.chunk") == 21


async def test_a_client_that_leaves_while_the_upstream_is_silent_closes_the_upstream_at_once(driver: str) -> None:
    runner, url = await scripted_upstream([chunk_event("one"), 30.0, b"data: [DONE]\n\n"])
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(url)
            relay = EventRelay(OpenAIStreamMeter(True), None, lambda m: b"", redact=Redactor([KEY]))
            client, hangup = RecordingClient(), Hangup()
            if driver == "async":  # Starlette cancels the iteration when the client leaves

                async def consume() -> None:
                    async for chunk in relay_events(response, relay, heartbeat=0.05):
                        client.write(chunk)

                task, leave, gone = asyncio.ensure_future(consume()), None, asyncio.CancelledError
            else:  # uvicorn says http.disconnect
                direct = DirectRelay(response, relay, client, 0.05)  # type: ignore[arg-type]
                task, leave, gone = asyncio.ensure_future(direct.run(hangup)), hangup.leave, ClientGone
            await asyncio.sleep(0.3)  # several heartbeats' worth of silence: the relay waits for the upstream
            assert client.chunks[0] == chunk_event("one") and HEARTBEAT in client.chunks
            if leave is None:
                task.cancel()
            else:
                leave()
            with pytest.raises(gone):
                await asyncio.wait_for(task, 2)
            assert response.closed
            await asyncio.wait_for(runner.app[CLOSED].wait(), 2)
    finally:
        await runner.cleanup()


async def test_a_real_cancellation_at_the_moment_a_heartbeat_is_due_is_not_swallowed() -> None:
    never: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    silence = Silence(60)

    async def reader() -> bytes | None:
        return await silence.read(lambda: never)

    task = asyncio.ensure_future(reader())
    await asyncio.sleep(0)  # waiting in the read
    task.cancel()  # the client left...
    silence._last -= 120  # ...in the same turn of the loop as the heartbeat's timer fires
    silence._tick()
    with pytest.raises(asyncio.CancelledError):
        await task
    silence.close()


async def test_a_heartbeat_read_gives_up_nothing_the_upstream_sent_meanwhile() -> None:
    """The data arrives in the very turn the heartbeat interrupts the read: it is read next time."""
    reader = asyncio.StreamReader()
    silence = Silence(60)
    task = asyncio.ensure_future(silence.read(lambda: reader.read(100)))
    await asyncio.sleep(0)
    reader.feed_data(b"data: x\n\n")  # wakes the read...
    silence._last -= 120
    silence._tick()  # ...and the heartbeat interrupts it before it ran
    assert await task is None
    assert await asyncio.wait_for(silence.read(lambda: reader.read(100)), 1) == b"data: x\n\n"
    silence.close()


async def test_a_key_echoed_in_an_event_cut_across_upstream_chunks_is_scrubbed(driver: str) -> None:
    echoed = encode({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"key {KEY}"}}]})
    cut = echoed.index(KEY.encode()) + 8
    chunks = await relayed([echoed[:cut], 0.05, echoed[cut:], USAGE, b"data: [DONE]\n\n"], heartbeat=10, driver=driver)
    body = events_of(chunks)
    assert KEY.encode() not in body and KEY[:12].encode() not in body
    assert MARK in json.loads(body.split(b"\n\n")[0].removeprefix(b"data: "))["choices"][0]["delta"]["content"]


@pytest.mark.parametrize("heartbeat", [0.0, 10.0], ids=["aiohttp's timer", "the heartbeat's timer"])
async def test_an_upstream_silent_past_the_read_timeout_ends_the_stream_with_an_error_after_all_it_sent(
    heartbeat: float, driver: str
) -> None:
    first, second = chunk_event("one"), chunk_event("two")
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks = await relayed([first, 0.1, second, 3.0, b"data: [DONE]\n\n"], heartbeat, read_timeout=0.3, driver=driver)
    assert loop.time() - started < 1.5
    assert events_of(chunks).startswith(first + second)
    error = json.loads(chunks[-1].removeprefix(b"data: "))["error"]
    assert error == "The upstream stopped sending data (read timeout)."


async def test_the_direct_relay_stops_reading_while_the_client_is_slow_and_loses_nothing() -> None:
    """A client that does not read: the relay stops taking the upstream's bytes (aiohttp's buffer
    stays bounded and the upstream socket is no longer read), then relays everything once the
    client drains."""
    big = [chunk_event(f"{i:04d}" + "x" * 5000) for i in range(400)]  # ~2 MB
    runner, url = await scripted_upstream([*big, USAGE, b"data: [DONE]\n\n"])
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(url)
            relay = EventRelay(OpenAIStreamMeter(True), None, lambda m: b"", redact=Redactor([KEY]))
            client = RecordingClient()
            write = client.write

            def fills_up(data: bytes) -> None:
                write(data)
                client.paused = True  # the client's socket is full after the first write
                client.writable.clear()

            client.write = fills_up  # type: ignore[method-assign]
            task = asyncio.ensure_future(DirectRelay(response, relay, client).run(Hangup()))  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            assert len(client.chunks) == 1
            assert response.content._size < 1024 * 1024  # bounded: aiohttp paused the upstream socket
            assert response.connection is not None and response.connection.protocol._reading_paused
            client.write = write  # type: ignore[method-assign]
            client.paused = False
            client.writable.set()
            await asyncio.wait_for(task, 5)
            assert b"".join(client.chunks) == b"".join(big) + USAGE + b"data: [DONE]\n\n"
    finally:
        await runner.cleanup()


async def test_the_direct_relay_relays_the_bytes_that_came_before_a_break_then_one_error() -> None:
    first, second = chunk_event("one"), chunk_event("two")

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first + second)
        assert request.transport is not None
        request.transport.close()  # no last chunk: the body is cut
        return response

    app = web.Application()
    app.router.add_post("/stream", cut)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(f"http://127.0.0.1:{port}/stream")
            await asyncio.sleep(0.2)  # the bytes and the break both arrived before the relay starts
            relay = EventRelay(OpenAIStreamMeter(True), None, lambda m: encode({"error": m}), redact=Redactor([KEY]))
            client = RecordingClient()
            await DirectRelay(response, relay, client, 10.0).run(Hangup())  # type: ignore[arg-type]
            body = b"".join(client.chunks)
            assert body.startswith(first + second)
            error = json.loads(client.chunks[-1].removeprefix(b"data: "))["error"]
            assert error == "The upstream connection broke off in the middle of the stream."
            assert response.closed
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("http", "guarded", "direct"), [("httptools", True, 1), ("httptools", False, 1), ("h11", False, 0)]
)
def test_uvicorn_as_app_py_serves_takes_the_direct_relay_and_other_servers_the_async_one(
    http: str, guarded: bool, direct: int, tmp_path: Any, fake_openai: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path hangs on uvicorn's internals (proxy/relay.py): if an upgrade moved them,
    every stream would quietly take the async path and the other tests would not notice."""
    import httpx

    from proxy.server import create_app
    from tests.conftest import PAID, PROXY_KEY, make_settings, serve

    runs: list[DirectRelay] = []
    real_run = DirectRelay.run

    async def counted(self: DirectRelay, receive: Any) -> None:
        runs.append(self)
        await real_run(self, receive)

    monkeypatch.setattr(DirectRelay, "run", counted)
    settings = make_settings(
        {"OPENAI_KEY": PAID, "OPENAI_BASE_URL": fake_openai.base_url, "PROXY_KEY": PROXY_KEY}, tmp_path
    )
    with serve(create_app(settings), settings, guarded=guarded, http=http) as served:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        auth = {"Authorization": f"Bearer {PROXY_KEY}"}
        with httpx.stream("POST", f"{served.proxy()}/chat/completions", json=body, headers=auth, timeout=10) as reply:
            text = reply.read().decode()
    assert reply.status_code == 200 and text.rstrip().endswith("data: [DONE]")
    assert len(runs) == direct
