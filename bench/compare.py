"""A/B: the same load on proxies served from several source trees, interleaved run by run.

    cp -r . /tmp/benchcopy && (cd /tmp/benchcopy && patch -p1 < my.patch)
    python bench/compare.py --repo base=. --repo patched=/tmp/benchcopy [--log-level info] [--stream]
    python bench/compare.py --app full --repo base=. --repo unfrozen=.+gc-freeze=off --repo noisy=.+access-log=on

A tree is NAME=DIR, optionally followed by +OPTION of bench/proxy_server.py (without the dashes).

Every proxy runs at once (pinned to the same core, idle while another is measured) behind the
same nginx fake upstream; the runs go round-robin, so background load drifts over them alike.
Prints medians of req/s at 64 connections, p50/p99 at 1 connection and the proxy's CPU time
per request, which depends least on background load and so is the best figure for an A/B.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import upstream  # noqa: E402
from proxy_server import PROXY_KEY  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", action="append", required=True, help="NAME=DIR[+OPTION...], repeatable")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--app", default="proxy", choices=["proxy", "full"])
    parser.add_argument(
        "--access-log", default="off", choices=["on", "off"], help="uvicorn's access line (app.py: off)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--latency-duration", type=float, default=2)
    parser.add_argument(
        "--priority", type=int, default=harness.PRIORITY, help=f"nice value of the servers and wrk ({harness.PRIORITY})"
    )
    args = parser.parse_args()
    harness.PRIORITY = args.priority
    repos, options = {}, {}
    for item in args.repo:
        name, _, spec = item.partition("=")
        repos[name], *options[name] = spec.split("+")
    harness.need("wrk")
    harness.need("nginx")

    with tempfile.TemporaryDirectory(prefix="proxy-compare-") as tmp:
        workdir = Path(tmp)
        procs = harness.Procs(workdir)
        runs: dict[str, list[tuple[harness.WrkResult, harness.WrkResult]]] = {name: [] for name in repos}
        try:
            up_port, stream_port = harness.free_port(), harness.free_port()
            conf = workdir / "upstream.conf"
            conf.write_text(upstream.nginx_upstream_conf(workdir, up_port, stream_port))
            procs.start(
                "upstream", [*harness.pin(harness.UPSTREAM_CORES), "nginx", "-p", str(workdir), "-c", str(conf)]
            )
            base = f"http://127.0.0.1:{stream_port if args.stream else up_port}/v1"
            urls, pids = {}, {}
            for name, repo in repos.items():
                proc, port = harness.start_proxy(
                    procs, name, base, log_level=args.log_level, app=args.app, repo=repo, cores=harness.PROXY_CORES,
                    access_log=args.access_log,
                    extra=[f"--{option}" for option in options[name]],
                )  # fmt: skip
                urls[name] = f"http://127.0.0.1:{port}/proxy/openai/v1/chat/completions"
                pids[name] = [proc.pid]
            body = harness.STREAM_REQUEST if args.stream else harness.REQUEST
            for name, url in urls.items():
                harness.wait_http(url.split("/proxy/")[0] + "/health", timeout=60, proc=dict(procs.children)[name])
                status, reply = harness.post(url, body, PROXY_KEY)
                if status != 200:
                    raise RuntimeError(f"{name}: {status} {reply[:300]!r}")
                harness.run_wrk(url, 64, 1, body, PROXY_KEY, procs, harness.WRK_CORES, pids[name])
            for rep in range(args.repeat):
                for name, url in urls.items():
                    r64 = harness.run_wrk(url, 64, args.duration, body, PROXY_KEY, procs, harness.WRK_CORES, pids[name])
                    r1 = harness.run_wrk(
                        url, 1, args.latency_duration, body, PROXY_KEY, procs, harness.WRK_CORES, pids[name]
                    )
                    runs[name].append((r64, r1))
                    print(
                        f"[{rep + 1}/{args.repeat}] {name:12s} {r64.rps:7.0f} req/s  {r64.server_cpu_us:5.0f} µs/req  "
                        f"p50 {r1.p50_ms:.3f} ms  p99 {r1.p99_ms:.3f} ms  other load {r64.other_cpu:.2f}"
                        + (f"  ERRORS {r64.non2xx + r1.non2xx}" if r64.non2xx + r1.non2xx else ""),
                        file=sys.stderr,
                        flush=True,
                    )
        except KeyboardInterrupt:
            return 130
        finally:
            procs.close()
    med = harness.median
    print(
        f"{'SSE stream' if args.stream else 'JSON'}, LOG_LEVEL={args.log_level}, app={args.app}, "
        f"medians of {args.repeat} runs"
    )
    print("| tree | req/s @64 | CPU/req @64 (µs) | p50 @1 (ms) | p99 @1 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in runs.items():
        print(
            f"| {name} | {med([a.rps for a, _ in rs]):,.0f} | {med([a.server_cpu_us for a, _ in rs]):.0f} | "
            f"{med([b.p50_ms for _, b in rs]):.3f} | {med([b.p99_ms for _, b in rs]):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
