"""Profile the proxy under load with py-spy, and print where its CPU time goes.

    pip install py-spy
    python bench/profile_proxy.py                 # 64 connections, non-streamed, LOG_LEVEL=warning
    python bench/profile_proxy.py --stream --log-level info --seconds 10 --repo /tmp/benchcopy

Starts the nginx fake upstream and the proxy (as bench/overhead.py does), drives the proxy with
wrk at 64 connections, samples it with `py-spy record` (idle time excluded, so the shares are of
the proxy's busy CPU), and prints: self time by layer (the package of the innermost Python
frame), self time by function, and inclusive time of the request path's main steps. The raw
samples (collapsed stacks, flamegraph.pl's input) are kept with `--raw FILE`.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import upstream  # noqa: E402
from proxy_server import PROXY_KEY  # noqa: E402

# wrk away from the proxy's core: py-spy counts a preempted (runnable) thread as busy, so wrk
# preempting the proxy on a shared core would show up as time in the proxy's socket writes.
WRK_CORES = harness.UPSTREAM_CORES

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Innermost-first: the first rule whose pattern is in a frame's file names the layer.
LAYERS = [
    ("logging", "logging/"),
    ("proxy/logs.py (redacting filter)", "proxy/logs.py"),
    ("json (stdlib)", "json/"),
    ("aiohttp client", "aiohttp/"),
    ("yarl/multidict (aiohttp URLs, headers)", "yarl/"),
    ("yarl/multidict (aiohttp URLs, headers)", "multidict/"),
    ("uvicorn + httptools (server)", "uvicorn/"),
    ("starlette (routing, middleware, responses)", "starlette/"),
    ("fastapi (middleware)", "fastapi/"),
    ("gradio", "gradio/"),
    ("anyio", "anyio/"),
    ("proxy (own code)", "proxy/"),
    ("asyncio", "asyncio/"),
    ("pydantic", "pydantic"),
]

# Inclusive shares of steps of the request path: (label, function name pattern, file pattern).
STEPS = [
    ("Pipeline.handle (whole proxy route)", "Pipeline.handle", "pipeline.py"),
    ("  read_json (body read + json.loads + drop_redirect_fields)", "read_json", "proxy/body.py"),
    ("  _read_json (older trees)", "Pipeline._read_json", "pipeline.py"),
    ("  request.url (Starlette builds a URL object)", "HTTPConnection.url", "starlette/requests.py"),
    ("  _forward (key selection, headers, aiohttp request)", "Pipeline._forward", "pipeline.py"),
    ("    aiohttp ClientSession._request", "ClientSession._request", "aiohttp/client.py"),
    ("  _complete (read reply, json.loads, account, Response)", "Pipeline._complete", "pipeline.py"),
    ("    UsageLedger.record (usage ledger and its store sink)", "UsageLedger.record", "proxy/usage.py"),
    ("      SQLiteStore.add_usage (a transaction per request)", "SQLiteStore.add_usage", "proxy/store.py"),
    ("  _log (the access line)", "Pipeline._log", "pipeline.py"),
    ("  json.dumps (stdlib, anywhere)", "dumps", "json/__init__.py"),
    ("  json.loads (stdlib, anywhere)", "loads", "json/__init__.py"),
    ("  relay_events (SSE: parse, meter, re-yield)", "relay_events", "proxy/upstream.py"),
    ("middleware stack above the route (FastAPI/Starlette)", "ServerErrorMiddleware.__call__", "starlette/"),
    ("  FastAPI telemetry check (os.environ lookups)", "NativeTelemetry.enabled", "fastapi/"),
    ("response send (Response.__call__)", "Response.__call__", "starlette/responses.py"),
    ("logging (all)", "", "logging/"),
    ("uvicorn protocol (parsing, run_asgi, send)", "", "uvicorn/protocols/http/"),
]


def parse_raw(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    samples = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            m = FRAME.match(frame)
            frames.append((m["func"], m["file"]) if m else (frame, ""))
        samples.append((frames, int(count)))
    return samples


def report(samples: list[tuple[list[tuple[str, str]], int]], top: int) -> str:
    total = sum(c for _, c in samples) or 1
    layers: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        func, file = frames[-1]
        selfs[f"{func} ({file})"] += count
        layer = "other (C, interpreter, site-packages)"
        for _func, f_file in reversed(frames):
            hit = next((name for name, pattern in LAYERS if pattern in f_file), None)
            if hit:
                layer = hit
                break
        layers[layer] += count
        for label, func_pat, file_pat in STEPS:
            if any((not func_pat or f_func == func_pat) and file_pat in f_file for f_func, f_file in frames):
                steps[label] += count
    out = [f"{total} samples of busy CPU (idle excluded)", "", "Self time by layer (innermost Python frame):"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in layers.most_common()]
    out += ["", f"Self time, top {top} functions:"]
    out += [f"  {100 * c / total:5.1f}%  {name}" for name, c in selfs.most_common(top)]
    out += ["", "Inclusive time of the request path's steps:"]
    out += [f"  {100 * steps[label] / total:5.1f}%  {label}" for label, _, _ in STEPS]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--access-log", default="off", choices=["on", "off"], help="uvicorn's access line (app.py: off)"
    )
    parser.add_argument("--stream", action="store_true", help="profile SSE streams instead of JSON replies")
    parser.add_argument("--app", default="proxy", choices=["proxy", "full"])
    parser.add_argument("--repo", default=str(harness.REPO))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    parser.add_argument("--from-raw", type=Path, help="only analyse an existing raw file")
    parser.add_argument(
        "--priority", type=int, default=harness.PRIORITY, help=f"nice value of the servers and wrk ({harness.PRIORITY})"
    )
    args = parser.parse_args()
    harness.PRIORITY = args.priority
    if args.from_raw:
        print(report(parse_raw(args.from_raw), args.top))
        return 0
    for tool in ("wrk", "nginx", "py-spy"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/profile_proxy.py needs `{tool}` (py-spy: pip install py-spy)")

    with tempfile.TemporaryDirectory(prefix="proxy-profile-") as tmp:
        workdir = Path(tmp)
        procs = harness.Procs(workdir)
        try:
            up_port, stream_port = harness.free_port(), harness.free_port()
            conf = workdir / "upstream.conf"
            conf.write_text(upstream.nginx_upstream_conf(workdir, up_port, stream_port))
            procs.start(
                "upstream", [*harness.pin(harness.UPSTREAM_CORES), "nginx", "-p", str(workdir), "-c", str(conf)]
            )
            base = f"http://127.0.0.1:{stream_port if args.stream else up_port}/v1"
            proxy, port = harness.start_proxy(
                procs, "proxy", base, log_level=args.log_level, app=args.app, repo=args.repo, cores=harness.PROXY_CORES,
                access_log=args.access_log,
            )  # fmt: skip
            harness.wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proxy)
            url = f"http://127.0.0.1:{port}/proxy/openai/v1/chat/completions"
            body = harness.STREAM_REQUEST if args.stream else harness.REQUEST
            harness.run_wrk(url, 64, 1, body, PROXY_KEY, procs, WRK_CORES)  # warm-up
            result: dict[str, harness.WrkResult] = {}
            load = threading.Thread(
                target=lambda: result.setdefault(
                    "wrk",
                    harness.run_wrk(url, 64, args.seconds + 2, body, PROXY_KEY, procs, WRK_CORES, [proxy.pid]),
                )
            )
            load.start()
            raw = args.raw or workdir / "profile.txt"
            spy = subprocess.run(
                ["py-spy", "record", "--pid", str(proxy.pid), "--duration", str(int(args.seconds)), "--rate",
                 str(args.rate), "--format", "raw", "-o", str(raw)],
                capture_output=True, text=True, timeout=args.seconds + 30, check=False,
            )  # fmt: skip
            load.join()
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed: {spy.stderr[-500:]}")
            wrk = result["wrk"]
            print(
                f"load: {wrk.rps:,.0f} req/s at 64 connections, {wrk.server_cpu_us:.0f} µs proxy CPU per request "
                f"(py-spy slows the proxy a little), {'SSE' if args.stream else 'JSON'}, LOG_LEVEL={args.log_level}\n"
            )
            print(report(parse_raw(raw), args.top))
        finally:
            procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
