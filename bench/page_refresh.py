"""What visitors polling the page cost the proxy's requests (issue 9, item 6).

    python bench/page_refresh.py [--repo base=/tmp/old --repo new=.] [--clients 50] [--seconds 5]

Each tree's whole app (`--app full`, Gradio mounted) is served by bench/proxy_server.py over the
aiohttp fake upstream (bench/upstream.py). For each tree, the proxy's p50/p99 at one connection
(wrk, POST of a small chat request) is measured with no visitor, then while `--clients`
visitors loop the page's live refresh (the event its 5-second timer triggers) back to back, as
fast as the server answers them: POST /gradio_api/queue/join, then the SSE stream of
/gradio_api/queue/data until `process_completed`. The trees run one after the other, each with
both measurements, `--repeat` times round-robin; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from proxy_server import PROXY_KEY  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}


def refresh_event(config: dict) -> int:
    timers = {c["id"] for c in config["components"] if c["type"] == "timer" and (c.get("props") or {}).get("active")}
    (dep,) = [d for d in config["dependencies"] if any(t[0] in timers and t[1] == "tick" for t in d["targets"])]
    return dep["id"]


async def loop_refreshes(url: str, clients: int, seconds: float) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/config") as response:
            fn_index = refresh_event(await response.json())
        done = 0
        stop = time.monotonic() + seconds

        async def visitor() -> None:
            nonlocal done
            while time.monotonic() < stop:
                session = uuid.uuid4().hex[:12]
                body = {"data": [], "fn_index": fn_index, "session_hash": session, "event_data": None}
                async with http.post(url + "/gradio_api/queue/join", json=body) as joined:
                    await joined.read()
                async with http.get(url + "/gradio_api/queue/data", params={"session_hash": session}) as stream:
                    async for line in stream.content:
                        if b'"process_completed"' in line:
                            done += 1
                            break

        await asyncio.gather(*(visitor() for _ in range(clients)))
        return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", help="NAME=DIR, repeatable (default: this tree)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", help=argparse.SUPPRESS)  # internal: be the visitors, against this URL
    args = parser.parse_args()
    if args.loop:
        print(json.dumps({"refreshes": asyncio.run(loop_refreshes(args.loop, args.clients, args.seconds))}))
        return 0
    harness.need("wrk")
    trees = [r.split("=", 1) for r in (args.repo or [f"this={harness.REPO}"])]
    procs = harness.Procs(Path(tempfile.mkdtemp(prefix="page-refresh-")))
    results: dict[str, dict[str, list]] = {name: {"idle": [], "polled": [], "refreshes": []} for name, _ in trees}
    try:
        up_port = harness.free_port()
        upstream = procs.start("upstream", [sys.executable, str(harness.BENCH / "upstream.py"), str(up_port)])
        harness.wait_http(f"http://127.0.0.1:{up_port}/", proc=upstream)
        urls = {}
        for name, repo in trees:
            proc, port = harness.start_proxy(
                procs, name, f"http://127.0.0.1:{up_port}/v1", app="full", repo=repo, access_log="off"
            )
            harness.wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
            urls[name] = f"http://127.0.0.1:{port}"
        for _ in range(args.repeat):
            for name, url in urls.items():
                target = url + "/proxy/openai/v1/chat/completions"
                idle = harness.run_wrk(target, 1, args.seconds, BODY, PROXY_KEY, procs)
                visitors = subprocess.Popen(
                    [sys.executable, __file__, "--loop", url, "--clients", str(args.clients),
                     "--seconds", str(args.seconds + 3)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                time.sleep(2)
                polled = harness.run_wrk(target, 1, args.seconds, BODY, PROXY_KEY, procs)
                out, _ = visitors.communicate(timeout=60)
                refreshes = json.loads(out.strip().splitlines()[-1])["refreshes"]
                results[name]["idle"].append(idle)
                results[name]["polled"].append(polled)
                results[name]["refreshes"].append(refreshes / (args.seconds + 3))
    finally:
        procs.close()

    med = harness.median
    print(f"\n{args.clients} visitors looping the page refresh; proxy at 1 connection; medians of {args.repeat} runs")
    print("| tree | p50 idle (ms) | p50 polled (ms) | p99 idle (ms) | p99 polled (ms) | refreshes/s served |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {med([x.p50_ms for x in r['idle']]):.2f} | {med([x.p50_ms for x in r['polled']]):.2f} "
            f"| {med([x.p99_ms for x in r['idle']]):.2f} | {med([x.p99_ms for x in r['polled']]):.2f} "
            f"| {med(r['refreshes']):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
