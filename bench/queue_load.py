"""The fair queue under load: 200 clients on one key that allows 20 requests a second.

    python bench/queue_load.py                    # about 40 s; prints a markdown table
    python bench/queue_load.py --duration 30 --clients 200 --rate 20

Starts an aiohttp fake upstream whose one key serves `--rate` requests per sliding second and
answers 429 beyond (with `retry-after-ms` and OpenAI's `x-ratelimit-*-requests` headers on every
reply, as OpenAI does), and the proxy (bench/proxy_server.py, one uvicorn worker, default queue
settings). The clients are `--users` addresses (127.0.0.1 ... 127.0.0.N: the proxy's fairness is
per address without user tokens) holding unequal numbers of connections (1, 2, ... so that a
first-come-first-served queue would favour the users with more connections), each connection
sending non-streamed chat requests back to back. Measured over `--duration` seconds after a
warm-up: served requests per second (the key's limit is the ceiling), the time each request
spent (the upstream answers at once, so this is its queue wait) p50/p99, Jain's fairness index
over the users' served counts, 429s seen by clients, upstream 429s, and the proxy's CPU time per
served request (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from proxy_server import PROXY_KEY  # noqa: E402

REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16}


def serve_upstream(port: int, rate: int) -> None:
    """A fake OpenAI whose key allows `rate` requests per sliding second."""
    from aiohttp import web

    admitted: deque[float] = deque()
    counts = {"served": 0, "refused": 0}
    body = json.dumps(
        {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        }  # fmt: skip
    ).encode()

    def window(now: float) -> tuple[int, float]:
        while admitted and admitted[0] <= now - 1.0:
            admitted.popleft()
        reset = admitted[0] + 1.0 - now if admitted else 0.0
        return rate - len(admitted), max(reset, 0.0)

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        left, reset = window(now)
        if left <= 0:
            counts["refused"] += 1
            headers = {
                "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{reset * 1000:.0f}ms",
                "retry-after-ms": str(max(1, round(reset * 1000))), "retry-after": "1",
            }  # fmt: skip
            error = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
            return web.json_response(error, status=429, headers=headers)
        admitted.append(now)
        counts["served"] += 1
        left, reset = window(now)
        headers = {"x-ratelimit-remaining-requests": str(left), "x-ratelimit-reset-requests": f"{reset * 1000:.0f}ms"}
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def load(url: str, users: list[int], warmup: float, duration: float) -> dict:
    import aiohttp

    results: list[tuple[int, float, float, int]] = []  # (user, start, seconds, status)
    stop_at = time.monotonic() + warmup + duration
    sessions = []

    async def client(user: int, session: aiohttp.ClientSession) -> None:
        headers = {"authorization": f"Bearer {PROXY_KEY}"}
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                async with session.post(url, json=REQUEST, headers=headers) as reply:
                    await reply.read()
                    status = reply.status
            except aiohttp.ClientError:
                status = 0
            results.append((user, started, time.monotonic() - started, status))
            if status != 200:
                await asyncio.sleep(0.5)

    tasks = []
    for user, connections in enumerate(users):
        connector = aiohttp.TCPConnector(limit=0, local_addr=(f"127.0.0.{user + 1}", 0))
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        sessions.append(session)
        tasks += [asyncio.create_task(client(user, session)) for _ in range(connections)]
    began = time.monotonic()
    await asyncio.gather(*tasks)
    for session in sessions:
        await session.close()
    return {"results": results, "measure_from": began + warmup, "measure_to": began + warmup + duration}


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rate", type=int, default=20, help="requests per second the upstream key allows")
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=8)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.rate)
        return 0

    # Unequal connections per user: 1, 2, 3, ... scaled to --clients in total.
    weights = list(range(1, args.users + 1))
    users = [max(1, round(w * args.clients / sum(weights))) for w in weights]
    users[-1] += args.clients - sum(users)

    with tempfile.TemporaryDirectory(prefix="proxy-queue-bench-") as tmp:
        procs = harness.Procs(Path(tmp))
        try:
            up_port = harness.free_port()
            argv = [sys.executable, __file__, "--serve-upstream", str(up_port), "--rate", str(args.rate)]
            procs.start("upstream", argv)
            proc, port = harness.start_proxy(procs, "proxy", f"http://127.0.0.1:{up_port}/v1", access_log="off")
            harness.wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc)
            harness.wait_http(f"http://127.0.0.1:{up_port}/stats", timeout=30)
            pids = procs.descendants("proxy")
            url = f"http://127.0.0.1:{port}/proxy/openai/v1/chat/completions"
            cpu_before = [0]

            async def run() -> dict:
                async def mark() -> None:
                    await asyncio.sleep(args.warmup)
                    cpu_before[0] = harness.cpu_ns(pids)

                marker = asyncio.create_task(mark())
                out = await load(url, users, args.warmup, args.duration)
                await marker
                return out

            out = asyncio.run(run())
            cpu_ns = harness.cpu_ns(pids) - cpu_before[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{up_port}/stats", timeout=10) as reply:
                upstream_counts = json.loads(reply.read())
        finally:
            procs.close()

    start, end = out["measure_from"], out["measure_to"]
    window = [r for r in out["results"] if start <= r[1] + r[2] <= end]  # finished inside the window
    served = [r for r in window if r[3] == 200]
    waits = sorted(r[2] for r in served)
    per_user = [sum(1 for r in served if r[0] == u) for u in range(len(users))]
    refused = sum(1 for r in window if r[3] == 429)
    failed = sum(1 for r in window if r[3] not in (200, 429))
    duration = end - start
    cpu_per_request = cpu_ns / 1000 / max(len(served), 1)
    print("| figure | value |\n|---|---:|")
    print(f"| clients / users (connections per user: {min(users)}–{max(users)}) | {sum(users)} / {len(users)} |")
    print(f"| key limit | {args.rate} req/s |")
    print(f"| served | {len(served) / duration:.1f} req/s ({len(served)} in {duration:.0f} s) |")
    print(f"| queue wait p50 / p99 (client-seen time of served requests) | {statistics.median(waits):.2f} s / "
          f"{waits[int(len(waits) * 0.99) - 1]:.2f} s |")  # fmt: skip
    print(f"| Jain's fairness index over users' served counts | {jain(per_user):.3f} |")
    print(f"| first-come-first-served would give (share ∝ connections) | {jain([float(c) for c in users]):.3f} |")
    print(f"| 429 / other errors seen by clients | {refused} / {failed} |")
    print(f"| upstream: served / answered 429 (whole run, warm-up included) | {upstream_counts['served']} / "
          f"{upstream_counts['refused']} |")  # fmt: skip
    print(f"| proxy CPU per served request (whole process, /proc) | {cpu_per_request:,.0f} µs |")
    print(f"| proxy CPU use | {cpu_ns / 1e9 / duration:.3f} cores |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
