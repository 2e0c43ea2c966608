"""Streams at scale: 1,000 concurrent SSE streams, one chunk per 100 ms each, for 20 s, relayed by
the proxy and, side by side, by an nginx hop (`proxy_buffering off`).

    python bench/streams.py                       # 1,000 streams, 20 s, about 2 minutes
    python bench/streams.py --streams 200 --seconds 5
    python bench/streams.py --rows proxy --profile /tmp/relay.txt   # py-spy on the proxy meanwhile
    python bench/streams.py --repo /tmp/other-tree                  # the proxy of another tree
    python bench/streams.py --rows bare-readany,bare-callback       # the floor: bench/bare_relay.py

The upstream (an aiohttp server in its own process, on uvloop) writes, in every chunk, the wall-clock
time it sent it; the client (aiohttp, its own process, all streams on one uvloop loop) notes when each
chunk arrived. Per-chunk relay delay = arrival - sending, for every chunk of every stream; the
nginx row shows what the client, the upstream and the machine themselves add. CPU per chunk = the
relaying server's CPU time (all its threads) over the chunks it relayed; "once all open" = the same
from the moment every stream had its first chunk to the end (the streams' ends included, their
starts not), and the p99 delay of the chunks relayed meanwhile. RSS = the server's peak
resident memory during the run. Everything listens on 127.0.0.1; every process is stopped at the
end. Method and figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

PROXY_KEY = "pk-bench-streams"
KEY = "sk-bench-streams-0123456789abcdef"


def _fast_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop for the bench's own client and upstream (as uvicorn gives the proxy):
    the lighter they are, the less of the 2 cores and of the delays is theirs."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - installed with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve_upstream(port: int, interval: float, seconds: float) -> None:
    """A fake OpenAI streaming `seconds / interval` chunks, each stamped with its sending time."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        chunks = int(seconds / interval)
        for _ in range(chunks):
            delta = {"content": f"{time.time():.6f}"}
            event = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await asyncio.sleep(interval)
        done = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}}  # fmt: skip
        await response.write(b"data: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096, loop=_fast_loop())


async def drive(url: str, streams: int, token: str | None, out: Path) -> None:
    """Open `streams` streams at once (spread over 1 s); write every chunk's delay (ms) to `out`."""
    import aiohttp

    delays: list[float] = []
    complete = opened = 0
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": f"Bearer {token}"} if token else {}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal complete, opened
        await asyncio.sleep(i / streams)
        async with session.post(url, json=body, headers=headers) as response:
            buffer = b""
            first = True
            async for data in response.content.iter_any():
                if first:
                    first, opened = False, opened + 1
                    if opened == streams:  # every stream is open: the bench notes the CPU so far
                        print(f"open {len(delays)}", flush=True)
                now = time.time()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: {"):
                        content = json.loads(event[6:])["choices"][0]["delta"].get("content")
                        if content:
                            delays.append((now - float(content)) * 1000)
                    elif event == b"data: [DONE]":
                        complete += 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(streams)), return_exceptions=True)
    out.write_text(json.dumps({"complete": complete, "delays": delays}))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def run_row(
    name: str, url: str, token: str | None, pids: list[int], args: argparse.Namespace, work: Path,
    profile: Path | None = None,
) -> dict:  # fmt: skip
    out = work / f"{name.split()[0]}.json"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kb(pids))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    spy = None
    if profile is not None:  # sampled without pausing the proxy, so the delays stay comparable
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pids[0]), "--duration", str(int(args.seconds)), "--rate", "100",
             "--nonblocking", "--format", "raw", "-o", str(profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    cpu0 = harness.cpu_ns(pids)
    busy0, ours0 = harness.busy_jiffies(), harness.cpu_jiffies(harness_pids()) + harness.children_jiffies()
    code = (
        f"import asyncio, sys; sys.path.insert(0, {str(harness.BENCH)!r}); import streams; "
        f"streams._fast_loop().run_until_complete(streams.drive({url!r}, {args.streams}, {token!r}, "
        f"__import__('pathlib').Path({str(out)!r})))"
    )
    started = time.monotonic()
    client = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = client.stdout.readline() if client.stdout is not None else ""  # "open N": every stream is open
    cpu_open, chunks_open = harness.cpu_ns(pids), int(line.split()[1]) if line.startswith("open ") else None
    _, err = client.communicate(timeout=args.seconds + 120)
    if client.returncode != 0:
        raise RuntimeError(err[-1500:])
    if spy is not None:
        spy.wait(timeout=60)
    cpu_end = harness.cpu_ns(pids)
    cpu = cpu_end - cpu0
    elapsed_jiffies = harness.busy_jiffies() - busy0
    ours = harness.cpu_jiffies(harness_pids()) + harness.children_jiffies() - ours0
    stop.set()
    sampler.join()
    data = json.loads(out.read_text())
    delays = data["delays"]
    return {
        "row": name, "streams": args.streams, "complete": data["complete"], "chunks": len(delays),
        "p50_ms": percentile(delays, 0.5), "p99_ms": percentile(delays, 0.99), "max_ms": max(delays, default=0),
        "cpu_us_per_chunk": cpu / 1000 / max(len(delays), 1), "rss_mb": peak[0] / 1024,
        "cpu_us_per_chunk_open": (cpu_end - cpu_open) / 1000 / max(len(delays) - chunks_open, 1)
        if chunks_open is not None else float("nan"),
        "p99_open_ms": percentile(delays[chunks_open:], 0.99) if chunks_open is not None else float("nan"),
        "background_cores": max(elapsed_jiffies - ours, 0) / harness.HZ / max(time.monotonic() - started, 1e-9),
    }  # fmt: skip


_PROCS: list[harness.Procs] = []


def harness_pids() -> list[int]:
    """This benchmark and everything it started (to tell background load from our own)."""
    return [os.getpid(), *(pid for procs in _PROCS for pid in procs.descendants())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument(
        "--rows", default="nginx,proxy",
        help="which rows to run, comma-separated: nginx, proxy, bare-readany, bare-callback (bench/bare_relay.py)",
    )  # fmt: skip
    parser.add_argument("--repo", type=Path, default=harness.REPO, help="the tree whose app.py is measured")
    parser.add_argument("--profile", type=Path, help="py-spy the proxy during its row; raw stacks go here")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.interval, args.seconds)
        return 0
    harness.need("nginx")
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    with tempfile.TemporaryDirectory(prefix="proxy-streams-") as tmp:
        work = Path(tmp)
        procs = harness.Procs(work)
        _PROCS.append(procs)
        try:
            up = harness.free_port()
            procs.start("upstream", [sys.executable, __file__, "--serve-upstream", str(up),
                                     "--interval", str(args.interval), "--seconds", str(args.seconds)])  # fmt: skip
            hop = harness.free_port()
            conf = work / "hop.conf"
            conf.write_text(_nginx_hop(work, hop, up))
            procs.start("nginx-hop", ["nginx", "-p", str(work), "-c", str(conf)])
            port = harness.free_port()
            env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "HOST": "127.0.0.1",
                   "PORT": str(port), "OPENAI_KEY": KEY, "OPENAI_BASE_URL": f"http://127.0.0.1:{up}/v1",
                   "PROXY_KEY": PROXY_KEY, "CHECK_KEYS": "false", "LOG_LEVEL": "warning",
                   "DATA_DIR": str(work / "data"),
                   # Every stream at once, as through the nginx hop (the default, 512, queues the rest).
                   "UPSTREAM_MAX_CONNECTIONS": str(args.streams + 64)}  # fmt: skip
            proxy = procs.start("proxy", [sys.executable, str(args.repo / "app.py")], env=env)
            harness.wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proxy)
            harness.wait_ok(f"http://127.0.0.1:{port}/", timeout=120)  # the page, built after start
            time.sleep(0.5)
            rows = []
            if "nginx" in args.rows.split(","):
                rows.append(run_row("nginx hop (proxy_buffering off)", f"http://127.0.0.1:{hop}/v1/chat/completions",
                                    None, procs.descendants("nginx-hop"), args, work))  # fmt: skip
            if "proxy" in args.rows.split(","):
                rows.append(run_row("proxy (python app.py)", f"http://127.0.0.1:{port}/proxy/openai/v1/chat/completions",
                                    PROXY_KEY, procs.descendants("proxy"), args, work, args.profile))  # fmt: skip
            for mode in ("readany", "callback"):  # the floor: bench/bare_relay.py
                if f"bare-{mode}" in args.rows.split(","):
                    bare = harness.free_port()
                    procs.start(f"bare-{mode}", [sys.executable, str(harness.BENCH / "bare_relay.py"), mode],
                                env={**env, "PORT": str(bare)})  # fmt: skip
                    harness.wait_http(f"http://127.0.0.1:{bare}/health", timeout=60)
                    rows.append(run_row(f"bare relay, {mode} (bench/bare_relay.py)",
                                        f"http://127.0.0.1:{bare}/proxy/openai/v1/chat/completions", None,
                                        procs.descendants(f"bare-{mode}"), args, work))  # fmt: skip
        finally:
            procs.close()
    print("| row | streams complete | chunks | delay p50 (ms) | p99 (ms) | max (ms) | CPU/chunk (µs) "
          "| once all open: CPU/chunk (µs), p99 (ms) | peak RSS (MB) | background load (cores) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['row']} | {r['complete']}/{r['streams']} | {r['chunks']:,} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['cpu_us_per_chunk']:.1f} | "
              f"{r['cpu_us_per_chunk_open']:.1f}, {r['p99_open_ms']:.2f} | {r['rss_mb']:.0f} "
              f"| {r['background_cores']:.2f} |")  # fmt: skip
    if args.profile is not None and args.profile.exists():
        import profile_proxy

        print()
        print(profile_proxy.report(profile_proxy.parse_raw(args.profile), 30))
    return 0


def _nginx_hop(workdir: Path, port: int, upstream_port: int) -> str:
    return f"""
worker_processes 1;
daemon off;
error_log {workdir}/hop-error.log warn;
pid {workdir}/hop.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/hop-body;
  proxy_temp_path {workdir}/hop-proxy;
  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


if __name__ == "__main__":
    sys.exit(main())
