"""The fast fake upstreams the benchmark calls: nginx configurations, and an aiohttp fallback.

nginx (C, one worker) answers every `POST /v1/chat/completions` with a fixed chat.completion
(with usage), or with a fixed SSE stream on the stream port, so the upstream costs next to
nothing and the proxy's own cost is what gets measured. A second nginx configuration is the
reference hop: a plain `proxy_pass` with upstream keep-alive.

`python bench/upstream.py [PORT]` serves the same replies from aiohttp, for machines without
nginx (it is slower than nginx, so figures taken with it overstate the proxy's overhead).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODEL = "gpt-4o-mini"

COMPLETION = {
    "id": "chatcmpl-bench0000000000000000000000",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    "system_fingerprint": "fp_bench",
}

STREAM_WORDS = [
    "Hello",
    "!",
    " How",
    " can",
    " I",
    " help",
    " you",
    " today",
    "?",
    " I",
    " am",
    " a",
    " fake",
    " upstream",
    " for",
    " the",
    " overhead",
    " benchmark",
    ".",
    "",
]


def completion_body() -> bytes:
    return json.dumps(COMPLETION, separators=(",", ":")).encode()


def stream_body() -> bytes:
    """A chat.completion.chunk stream: one event per word, then the usage chunk and [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": MODEL}
    events = []
    for i, word in enumerate(STREAM_WORDS):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
        finish = "stop" if i == len(STREAM_WORDS) - 1 else None
        if finish:
            delta = {}
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        events.append(chunk)
    events.append({**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 19, "total_tokens": 28}})
    lines = [f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def _nginx_string(body: bytes) -> str:
    text = body.decode()
    if "'" in text or "\\" in text:
        raise ValueError("the fixed body must not contain quotes or backslashes")
    return "'" + text + "'"


def _nginx_common(workdir: Path) -> str:
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx-%(name)s.pid;
error_log {workdir}/nginx-%(name)s.error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
"""


def nginx_upstream_conf(workdir: Path, port: int, stream_port: int) -> str:
    """nginx as the fake OpenAI: fixed JSON on `port`, a fixed SSE stream on `stream_port`."""
    temp = _temp_paths(workdir, "upstream")
    return (
        (_nginx_common(workdir) % {"name": "upstream"})
        + f"""
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    {temp}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            add_header x-request-id req-bench;
            return 200 {_nginx_string(completion_body())};
        }}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{stream_port} reuseport backlog=4096;
        location = /v1/chat/completions {{
            default_type text/event-stream;
            add_header x-request-id req-bench;
            return 200 {_nginx_string(stream_body())};
        }}
        location / {{ return 404; }}
    }}
}}
"""
    )


def nginx_hop_conf(workdir: Path, port: int, upstream_port: int) -> str:
    """The reference hop: nginx proxy_pass with a keep-alive pool to the upstream."""
    temp = _temp_paths(workdir, "hop")
    return (
        (_nginx_common(workdir) % {"name": "hop"})
        + f"""
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    {temp}
    upstream fake {{ server 127.0.0.1:{upstream_port}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
    )


def _temp_paths(workdir: Path, name: str) -> str:
    parts = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n    ".join(f"{p}_temp_path {workdir}/{name}-{p};" for p in parts)


def serve_aiohttp(port: int) -> None:
    """The same fixed replies from a tiny aiohttp server (JSON, or SSE when the body asks to stream)."""
    from aiohttp import web

    completion, stream = completion_body(), stream_body()

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        if b'"stream":true' in body.replace(b" ", b""):
            return web.Response(body=stream, content_type="text/event-stream")
        return web.Response(body=completion, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    serve_aiohttp(int(sys.argv[1]) if len(sys.argv) > 1 else 18080)
