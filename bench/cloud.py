"""What the cloud providers add per request, measured side by side in one process.

    python bench/cloud.py

- SigV4: `Bedrock.target` (body rewrite + botocore signature) vs the default `Dialect.target` of
  Anthropic (headers only), on the same 2 kB Messages body.
- Event stream: decoding Bedrock frames into SSE (`EventStreamToSSE`), fed in 1 kB pieces, vs
  parsing the same events as SSE bytes (`SSEParser`): the extra cost of Bedrock's framing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.providers.anthropic.dialect import Anthropic  # noqa: E402
from proxy.providers.aws import Bedrock  # noqa: E402
from proxy.providers.aws.eventstream import EventStreamToSSE  # noqa: E402
from proxy.providers.base import Call  # noqa: E402
from proxy.sse import SSEParser  # noqa: E402
from tests.fakes_cloud import chunk_frame  # noqa: E402

BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 512,
                   "messages": [{"role": "user", "content": "word " * 400}]}).encode()  # fmt: skip


def per_call(n: int, fn) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


async def targets(n: int) -> tuple[float, float]:
    bedrock, anthropic = Bedrock("http://127.0.0.1:1"), Anthropic()
    secret = "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY:us-east-1"
    aws_call = Call("POST", "/model/claude-sonnet-4-5/invoke", secret, "", BODY)
    plain_call = Call("POST", "/messages", "sk-ant-x", "https://api.anthropic.com/v1", BODY)
    results = []
    for dialect, call in ((anthropic, plain_call), (bedrock, aws_call)):
        start = time.perf_counter()
        for _ in range(n):
            await dialect.target(call)
        results.append((time.perf_counter() - start) / n * 1e6)
    return results[0], results[1]


def main() -> None:
    plain, signed = asyncio.run(targets(5000))
    print(f"target(): anthropic {plain:.1f} us, bedrock (rewrite + SigV4) {signed:.1f} us per key tried")
    events = [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"tok{i} "}}
              for i in range(2000)]  # fmt: skip
    frames = b"".join(chunk_frame(e) for e in events)
    sse = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    pieces = [frames[i : i + 1024] for i in range(0, len(frames), 1024)]
    sse_pieces = [sse[i : i + 1024] for i in range(0, len(sse), 1024)]

    def decode() -> None:
        d, p = EventStreamToSSE(), SSEParser()
        for piece in pieces:
            p.feed(d(piece))

    def parse() -> None:
        p = SSEParser()
        for piece in sse_pieces:
            p.feed(piece)

    framed, plain_sse = per_call(20, decode) / len(events), per_call(20, parse) / len(events)
    print(f"stream event: SSE parse {plain_sse:.2f} us, Bedrock frame decode + SSE parse {framed:.2f} us")


if __name__ == "__main__":
    main()
