"""Limits on every route but the proxy's: a body size limit, and no file uploads to the page.

The proxy's routes have their own body limit (MAX_BODY_BYTES, in `proxy/body.py`). Everything
else (Gradio's routes, /admin/api, /proxy/me, /status) goes through `limit_body`: a declared
Content-Length over the limit is refused before any byte of the body is read, and a body that
grows past it while being read is cut off with the same 413. Gradio's upload routes are refused
outright: the page takes nothing as a file (the admin import is pasted text).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Gradio's routes that store what a client sends on disk.
UPLOAD_PATHS = frozenset({"/gradio_api/upload", "/gradio_api/process_recording"})


async def _send_error(send: Send, status: int, message: str, kind: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),  # the rest of the body is not read
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def limit_body(app: ASGIApp, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    """Run `app` on an HTTP request whose body may be at most `limit` bytes."""
    path = scope.get("path", "")
    if scope["method"] == "POST" and path.rstrip("/") in UPLOAD_PATHS:
        await _send_error(send, 403, "File uploads are disabled on this server.", "forbidden")
        return
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        await _send_error(send, 413, f"The request body is over {limit} bytes.", "request_too_large")
        return

    received = 0
    refused = False
    started = False

    async def limited_receive() -> Message:
        nonlocal received, refused
        if refused:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                refused = True
                if not started:
                    await _send_error(send, 413, f"The request body is over {limit} bytes.", "request_too_large")
                return {"type": "http.disconnect"}
        return message

    async def guarded_send(message: Message) -> None:
        nonlocal started
        if refused:
            return  # the 413 has been sent; whatever the app makes of the disconnect is dropped
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    await app(scope, limited_receive, guarded_send)
