"""The floor under the proxy's stream relay: a bare ASGI app under uvicorn (httptools, uvloop) that
forwards POST /proxy/openai/v1/chat/completions to the upstream with aiohttp and relays the reply,
nothing else (no auth, no parsing, no accounting). Run by `python bench/streams.py --rows
bare-readany,bare-callback`; standalone:

    PORT=8000 OPENAI_BASE_URL=http://127.0.0.1:9000/v1 python bench/bare_relay.py readany

- `readany`: `await reader.readany()` then uvicorn's `send()` per chunk (an async iteration, as
  Starlette's StreamingResponse does);
- `callback`: aiohttp's reader wakes a callback that writes each read to uvicorn's transport (the
  way proxy/relay.py relays, without its checks).

Every other path answers 200 "ok" (the bench waits for /health and /).
"""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import uvicorn

UPSTREAM = os.environ.get("OPENAI_BASE_URL", "")
MODE = sys.argv[1] if len(sys.argv) > 1 else "readany"
session: aiohttp.ClientSession | None = None


class _Wake:
    """Stands in for the future aiohttp's StreamReader completes when a read arrives."""

    def __init__(self, reader: aiohttp.StreamReader, write, done: asyncio.Future) -> None:
        self.reader, self.write, self.finished = reader, write, done

    def done(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def set_result(self, _result: object) -> None:
        asyncio.get_running_loop().call_soon(self.pump)

    def set_exception(self, exc: BaseException) -> None:
        asyncio.get_running_loop().call_soon(self.pump)

    def pump(self) -> None:
        reader = self.reader
        while reader._buffer:
            data = reader._read_nowait(-1)
            self.write(b"%x\r\n%b\r\n" % (len(data), data))
        if reader._eof or reader.exception() is not None:
            if not self.finished.done():
                self.finished.set_result(None)
        else:
            reader._waiter = self


async def app(scope, receive, send) -> None:
    global session
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            else:
                await session.close()  # type: ignore[union-attr]
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] != "/proxy/openai/v1/chat/completions":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    assert session is not None
    reply = await session.post(UPSTREAM + "/chat/completions", data=body, headers={"content-type": "application/json"})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    if MODE == "readany":
        while data := await reply.content.readany():
            await send({"type": "http.response.body", "body": data, "more_body": True})
    else:
        transport = send.__self__.transport  # uvicorn's httptools RequestResponseCycle
        finished = asyncio.get_running_loop().create_future()
        _Wake(reply.content, transport.write, finished).pump()
        await finished
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    reply.release()


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", loop="uvloop",
                http="httptools", backlog=4096)  # fmt: skip
