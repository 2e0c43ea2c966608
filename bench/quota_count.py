"""What counting a prompt for a quota costs, and whether it stalls the event loop.

    python bench/quota_count.py

For prompts of several sizes and shapes: the time `count_prompt` takes, and the longest event-loop
stall while `count_prompt_async` counts it with a 5 ms ticker running beside it, once with the
shipped INLINE_CHARS (big prompts go to a thread) and once forced inline. The quota bound is set
high so that counting runs to the end (the worst case; a small quota stops it early).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.access import tokens  # noqa: E402

SHAPES = {
    "chat 2 KB": "Tell me a story about a lighthouse keeper and a storm. " * 36,
    "chat 64 KB": "Tell me a story about a lighthouse keeper and a storm. " * 1150,
    "text 1 MB": "The quick brown fox jumps over the lazy dog. " * 23_000,
    "text 9 MB": "The quick brown fox jumps over the lazy dog. " * 200_000,
    "one word 9 MB": "x" * 9_000_000,
}


async def stall_while_counting(payload: dict) -> float:
    """The longest gap between 5 ms ticks while the prompt is counted."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst = max(worst, now - last - 0.005)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    await tokens.count_prompt_async(payload, bound=10**9)
    done = True
    await tick
    return worst


def main() -> None:
    tokens.encoding()  # loaded once at first use (~0.1 s); not part of a request's cost
    print("| prompt | tokens | count_prompt | loop stall, shipped | loop stall, forced inline |")
    print("|---|---:|---:|---:|---:|")
    shipped = tokens.INLINE_CHARS
    for name, text in SHAPES.items():
        payload = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
        started = time.perf_counter()
        counted = tokens.count_prompt(payload, bound=10**9)
        took = time.perf_counter() - started
        tokens.INLINE_CHARS = shipped
        threaded = asyncio.run(stall_while_counting(payload))
        tokens.INLINE_CHARS = 10**12
        inline = asyncio.run(stall_while_counting(payload))
        tokens.INLINE_CHARS = shipped
        print(f"| {name} | {counted:,} | {took * 1000:.1f} ms | {threaded * 1000:.1f} ms | {inline * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
