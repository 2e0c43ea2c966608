"""Soak: mixed hostile and careless traffic against `python app.py`, from several addresses.

    python bench/soak.py --duration 600        # the issue's 10-minute soak
    python bench/soak.py --duration 20 --json out.json

Starts fake OpenAI and Anthropic upstreams (tests/fakes.py) and `python app.py` on loopback
(fresh DATA_DIR, PROXY_KEY, both providers), then for `--duration` seconds runs, each from its own
address 127.0.0.x: workers sending a weighted mix of chat requests, full streams, streams the
client abandons after the first event, the OpenAI-format door to Claude, native Claude messages,
bad inputs (broken JSON, wrong types, lone surrogates, long model names, unknown paths), and
wrong keys; plus slow clients holding connections that trickle headers or bodies a byte at a
time. Throughout, /health is timed every 0.25 s and the app's RSS sampled every 2 s.

At the end the ledger (/status) must count every request the clients saw acknowledged (a 200
fully received; an abandoned stream may or may not be counted), then the app is killed with
SIGKILL, started again on the same DATA_DIR, and must report the same totals.

Pass: /health max <= --health-ms (50), RSS growth from the first to the last quarter of the run
<= 10 % + 16 MB, no unexpected status (a 5xx, a good request refused, a bad one served), every
acknowledged request counted, before and after the kill. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fakes import FakeAnthropic, FakeOpenAI, KeyBehaviour  # noqa: E402

OPENAI_KEY = "sk-soak-paid-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-soak-paid-0123456789"
PROXY_KEY = "pk-soak-proxy-key-0123"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi to the soak test"}]}
CLAUDE = "claude-3-5-haiku-20241022"

# kind: (weight, expected outcome) — "ok": a 200 fully read; "refused": a 4xx; "abandoned": the
# client leaves a 200 stream after its first event.
KINDS = {
    "chat": 30,
    "stream": 20,
    "abandon": 10,
    "door": 8,
    "claude": 8,
    "bad_json": 4,
    "bad_types": 4,
    "surrogate": 3,
    "long_model": 3,
    "unknown_path": 3,
    "wrong_key": 7,
}
GOOD = {"chat", "stream", "door", "claude"}


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, status) -> n
    unexpected: list[str] = field(default_factory=list)
    acknowledged: int = 0  # 200s fully received, which the ledger must count
    abandoned: int = 0  # 200 streams left early: may or may not be counted
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    slow_opened: int = 0
    slow_closed_by_server: int = 0

    def note(self, kind: str, status: int, detail: str = "") -> None:
        self.outcomes[(kind, status)] += 1
        good = kind in GOOD or kind == "abandon"
        expected = status == 200 if good else 400 <= status < 500
        if not expected and len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {status} {detail[:200]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_app(env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, str(REPO / "app.py")], cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT
    )


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Until the whole app is up: /health, then the page (built after the proxy starts serving;
    RSS compared over the run must start from the whole app's)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    for path in ("/health", "/"):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not start ({path})")
            try:
                with urllib.request.urlopen(url + path, timeout=2):
                    break
            except OSError:  # (HTTPError included: "/" answers 503 while the page is built)
                time.sleep(0.2)


def status_requests(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url + "/status", timeout=10) as reply:
        return int(json.loads(reply.read())["usage"]["requests"])


# ---------------------------------------------------------------- traffic


async def one_request(http, url: str, kind: str, tally: Tally) -> None:
    import aiohttp

    auth = {"Authorization": f"Bearer {PROXY_KEY}"}
    openai = f"{url}/proxy/openai/v1/chat/completions"
    if kind == "chat":
        method, target, body, headers = "POST", openai, json.dumps(CHAT), auth
    elif kind in ("stream", "abandon"):
        method, target, body, headers = "POST", openai, json.dumps({**CHAT, "stream": True}), auth
    elif kind == "door":
        method, target = "POST", f"{url}/proxy/anthropic/v1/chat/completions"
        body, headers = json.dumps({**CHAT, "model": CLAUDE}), auth
    elif kind == "claude":
        method, target = "POST", f"{url}/proxy/anthropic/v1/messages"
        payload = {"model": CLAUDE, "max_tokens": 64, "messages": CHAT["messages"]}
        body, headers = json.dumps(payload), {"x-api-key": PROXY_KEY, "anthropic-version": "2023-06-01"}
    elif kind == "bad_json":
        method, target, body, headers = "POST", openai, '{"model": "gpt-4o-mini", "messages": [', auth
    elif kind == "bad_types":
        method, target, body, headers = "POST", openai, json.dumps({"model": 5, "messages": "hi"}), auth
    elif kind == "surrogate":
        body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}'
        method, target, headers = "POST", openai, auth
    elif kind == "long_model":
        method, target, body, headers = "POST", openai, json.dumps({**CHAT, "model": "x" * 5000}), auth
    elif kind == "unknown_path":
        method, target, body, headers = "POST", f"{url}/proxy/openai/v1/files", "{}", auth
    elif kind == "wrong_key":
        method, target, body = "POST", openai, json.dumps(CHAT)
        headers = {"Authorization": f"Bearer wrong-{random.randrange(10**9)}"}
    else:
        raise ValueError(kind)
    headers = {**headers, "Content-Type": "application/json"}
    try:
        async with http.request(method, target, data=body.encode("utf-8", "surrogatepass"), headers=headers) as reply:
            status = reply.status
            if kind == "abandon" and status == 200:
                await reply.content.readline()
                reply.close()  # the client goes away mid-stream
                tally.abandoned += 1
                tally.note(kind, status)
                return
            text = await reply.text(errors="replace")
            if status == 200 and kind in ("stream", "door") and "stream" in body and "[DONE]" not in text:
                tally.note(kind, -1, "stream without [DONE]")
                return
            if status == 200:
                tally.acknowledged += 1
            tally.note(kind, status, text)
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.note(kind, -2, repr(exc))


async def worker(url: str, address: str, kinds: list[str], stop: float, tally: Tally, pause: float) -> None:
    import aiohttp

    weights = [KINDS[k] for k in kinds]
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=4)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        while time.monotonic() < stop:
            await one_request(http, url, random.choices(kinds, weights)[0], tally)
            await asyncio.sleep(random.uniform(0, pause))


async def slow_client(host: str, port: int, address: str, stop: float, tally: Tally, body: bool) -> None:
    """Holds a connection that trickles a byte every second; opens another when the server closes it."""
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(address, 0))
        except OSError:
            await asyncio.sleep(1)
            continue
        tally.slow_opened += 1
        if body:
            head = (
                "POST /proxy/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {PROXY_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            )
            writer.write(head.encode())
        else:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        closed = False
        while time.monotonic() < stop and not closed:
            try:
                writer.write(b"a")
                await writer.drain()
                data = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                closed = data == b"" or data.startswith(b"HTTP/1.1 4")
            except TimeoutError:
                continue
            except OSError:
                closed = True
        if closed:
            tally.slow_closed_by_server += 1
        writer.close()


async def monitor(url: str, pid: int, stop: float, tally: Tally) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0), limit=1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http:
        next_rss = 0.0
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                async with http.get(url + "/health") as reply:
                    await reply.read()
                    ok = reply.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ok = False
            if ok:
                tally.health_ms.append((time.perf_counter() - start) * 1000)
            else:
                tally.health_failures += 1
            now = time.monotonic()
            if now >= next_rss:
                tally.rss_mb.append((now, rss_mb(pid)))
                next_rss = now + 2
            await asyncio.sleep(0.25)


async def traffic(
    url: str, pid: int, duration: float, workers: int, slow: int, pause: float, tally: Tally, exclude: set[str]
) -> None:
    host, port = url.removeprefix("http://").split(":")
    stop = time.monotonic() + duration
    good = [k for k in KINDS if k != "wrong_key" and k not in exclude]
    tasks = [monitor(url, pid, stop, tally)]
    for i in range(workers):  # 127.0.0.2 ... : a few addresses, several workers each
        tasks.append(worker(url, f"127.0.0.{2 + i % 6}", good, stop, tally, pause))
    tasks.append(worker(url, "127.0.0.20", ["wrong_key"], stop, tally, pause))  # the guesser, from its own address
    for i in range(slow):
        tasks.append(slow_client(host, int(port), f"127.0.0.{30 + i % 4}", stop, tally, body=i % 2 == 1))
    await asyncio.gather(*tasks)


# ---------------------------------------------------------------- run and report


def run_soak(
    duration: float,
    workers: int = 12,
    slow: int = 40,
    pause: float = 0.05,
    health_ms: float = 50,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> dict:
    """Run the soak without the request kinds in `exclude`; returns the report (its "passed" says
    whether every check held)."""
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tally = Tally()
    with (
        FakeOpenAI({OPENAI_KEY: KeyBehaviour("paid")}, stream_delay=0.005) as fake_openai,
        FakeAnthropic({ANTHROPIC_KEY: KeyBehaviour("paid")}, stream_delay=0.005) as fake_anthropic,
    ):
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        env = {
            **keep,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "DATA_DIR": str(workdir / "data"),
            "OPENAI_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "ANTHROPIC_KEY": ANTHROPIC_KEY,
            "ANTHROPIC_BASE_URL": fake_anthropic.base_url,
            "PROXY_KEY": PROXY_KEY,
            "CHECK_KEYS": "false",
            "LOG_LEVEL": "warning",
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        log = workdir / "app.log"
        app = start_app(env, log)
        try:
            wait_health(url, app)
            started = time.monotonic()

            async def run() -> None:
                async def trim() -> None:  # the fakes record every request: keep the driver small
                    while time.monotonic() - started < duration:
                        await asyncio.sleep(5)
                        fake_openai.reset()
                        fake_anthropic.reset()

                await asyncio.gather(traffic(url, app.pid, duration, workers, slow, pause, tally, set(exclude)), trim())

            asyncio.run(run())
            time.sleep(1.5)  # the status cache: at most a second old
            counted = status_requests(url)
            app.send_signal(signal.SIGKILL)
            app.wait(10)
            app = start_app(env, log)
            wait_health(url, app)
            counted_after_kill = status_requests(url)
        finally:
            if app.poll() is None:
                app.terminate()
                try:
                    app.wait(10)
                except subprocess.TimeoutExpired:
                    app.kill()

    health = sorted(tally.health_ms)
    rss = [mb for _, mb in tally.rss_mb]
    quarter = max(1, len(rss) // 4)
    rss_first, rss_last = statistics.median(rss[:quarter]), statistics.median(rss[-quarter:])
    report = {
        "duration_s": duration,
        "excluded_kinds": sorted(exclude),
        "requests": sum(tally.outcomes.values()),
        "outcomes": {f"{k} {s}": n for (k, s), n in sorted(tally.outcomes.items())},
        "unexpected": tally.unexpected,
        "acknowledged": tally.acknowledged,
        "abandoned_streams": tally.abandoned,
        "ledger_requests": counted,
        "ledger_after_kill": counted_after_kill,
        "health_checks": len(health),
        "health_failures": tally.health_failures,
        "health_p50_ms": round(statistics.median(health), 2) if health else None,
        "health_p99_ms": round(health[int(len(health) * 0.99) - 1], 2) if health else None,
        "health_max_ms": round(health[-1], 2) if health else None,
        "rss_first_quarter_mb": round(rss_first, 1),
        "rss_last_quarter_mb": round(rss_last, 1),
        "rss_max_mb": round(max(rss), 1),
        "slow_connections_opened": tally.slow_opened,
        "slow_connections_closed_by_server": tally.slow_closed_by_server,
        "app_log": str(log),
    }
    checks = {
        "health within limit": bool(health) and health[-1] <= health_ms and tally.health_failures == 0,
        "rss flat": rss_last <= rss_first * 1.10 + 16,
        "no unexpected outcome": not tally.unexpected,
        "every acknowledged request counted": tally.acknowledged <= counted <= tally.acknowledged + tally.abandoned,
        "nothing lost on kill -9": counted_after_kill == counted,
        "slow clients cut off": tally.slow_closed_by_server > 0 or slow == 0,
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--workers", type=int, default=12, help="request loops, spread over 6 addresses")
    parser.add_argument("--slow", type=int, default=40, help="slow connections held open at once")
    parser.add_argument("--pause", type=float, default=0.05, help="most seconds a worker waits between requests")
    parser.add_argument("--health-ms", type=float, default=50)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--exclude", default="", help=f"comma-separated request kinds to leave out: {', '.join(KINDS)}")
    args = parser.parse_args()
    # The fakes log a traceback each time the proxy cancels an abandoned stream upstream: expected.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    exclude = {k for k in args.exclude.split(",") if k}
    report = run_soak(args.duration, args.workers, args.slow, args.pause, args.health_ms, exclude)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
