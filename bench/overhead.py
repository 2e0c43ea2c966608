"""The overhead the proxy adds over calling the same fast fake upstream directly.

    python bench/overhead.py                 # the default table, about 100 s
    python bench/overhead.py --full-app      # also the app with the Gradio page mounted
    python bench/overhead.py --repo /tmp/benchcopy   # measure a patched copy of the proxy

Starts nginx as the fake upstream (fixed chat.completion JSON, and a fixed SSE stream), nginx as
a reference hop, and the proxy (uvicorn, one worker) at LOG_LEVEL=warning and =info; drives each
with wrk (one thread, POST JSON): requests per second at 64 connections and p50/p99 latency at
1 connection. Each measurement is repeated (`--repeat`, round-robin over the scenarios so that
drifting background load touches them all alike); the table shows medians. "added p50" is the
scenario's p50 minus its reference's (the direct call to the same upstream). Everything listens
on 127.0.0.1 and is stopped at the end. See bench/README.md for the method and the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import upstream  # noqa: E402
from proxy_server import PROXY_KEY  # noqa: E402

TARGET_ADDED_P50_MS = 1.0
TARGET_RPS_64 = 1200.0


@dataclass
class Scenario:
    name: str
    url: str
    body: dict
    token: str | None = None
    reference: str | None = None  # the scenario whose p50 is subtracted for "added p50"
    server: str = ""  # the process (by Procs name) whose CPU time per request is reported
    pids: list[int] = field(default_factory=list)
    runs64: list[harness.WrkResult] = field(default_factory=list)
    runs1: list[harness.WrkResult] = field(default_factory=list)


def start_servers(args: argparse.Namespace, procs: harness.Procs, workdir: Path) -> list[Scenario]:
    up_port, stream_port, hop_port = harness.free_port(), harness.free_port(), harness.free_port()
    chat = "/v1/chat/completions"
    if args.upstream == "nginx":
        conf = workdir / "upstream.conf"
        conf.write_text(upstream.nginx_upstream_conf(workdir, up_port, stream_port))
        procs.start("upstream", [*harness.pin(args.upstream_cores), "nginx", "-p", str(workdir), "-c", str(conf)])
    else:
        stream_port = up_port  # the aiohttp fake streams when the body asks for it
        procs.start(
            "upstream",
            [*harness.pin(args.upstream_cores), sys.executable, str(harness.BENCH / "upstream.py"), str(up_port)],
        )
    hop_conf = workdir / "hop.conf"
    hop_conf.write_text(upstream.nginx_hop_conf(workdir, hop_port, up_port))
    procs.start("nginx-hop", [*harness.pin(args.proxy_cores), "nginx", "-p", str(workdir), "-c", str(hop_conf)])

    proxies = [
        ("proxy", up_port, "warning", "proxy"),
        ("proxy-info", up_port, "info", "proxy"),
        ("proxy-stream", stream_port, "warning", "proxy"),
    ]
    if args.full_app:
        proxies.append(("full-app", up_port, "warning", "full"))
    ports = {}
    for name, port_up, level, app in proxies:
        _, ports[name] = harness.start_proxy(
            procs, name, f"http://127.0.0.1:{port_up}/v1", log_level=level, app=app, repo=args.repo,
            cores=args.proxy_cores, access_log=args.access_log,
        )  # fmt: skip

    def at(port: int, path: str = chat) -> str:
        return f"http://127.0.0.1:{port}{path}"

    proxied = "/proxy/openai/v1/chat/completions"
    req, sreq = harness.REQUEST, harness.STREAM_REQUEST
    direct = "direct (wrk → upstream)"
    scenarios = [
        Scenario(direct, at(up_port), req, server="upstream"),
        Scenario("nginx hop (proxy_pass)", at(hop_port), req, None, direct, "nginx-hop"),
        Scenario("proxy, LOG_LEVEL=warning", at(ports["proxy"], proxied), req, PROXY_KEY, direct, "proxy"),
        Scenario("proxy, LOG_LEVEL=info", at(ports["proxy-info"], proxied), req, PROXY_KEY, direct, "proxy-info"),
    ]
    if args.full_app:
        scenarios.append(
            Scenario(
                "full app (Gradio mounted), warning", at(ports["full-app"], proxied), req, PROXY_KEY, direct, "full-app"
            )
        )
    if not args.no_stream:
        scenarios += [
            Scenario("direct, SSE stream", at(stream_port), sreq, server="upstream"),
            Scenario(
                "proxy, SSE stream, warning",
                at(ports["proxy-stream"], proxied),
                sreq,
                PROXY_KEY,
                "direct, SSE stream",
                "proxy-stream",
            ),
        ]
    by_name = dict(procs.children)
    for name, port in ports.items():
        harness.wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=by_name[name])
    harness.wait_http(at(up_port), proc=by_name["upstream"])
    harness.wait_http(at(hop_port), proc=by_name["nginx-hop"])
    for sc in scenarios:  # each scenario must really answer a completion before it is timed
        status, body = harness.post(sc.url, sc.body, sc.token)
        expected = b"chat.completion.chunk" if sc.body.get("stream") else b'"chat.completion"'
        if status != 200 or expected not in body:
            raise RuntimeError(f"{sc.name}: {status} {body[:300]!r}")
    for sc in scenarios:  # now that every server is up (nginx has forked its worker)
        sc.pids = procs.descendants(sc.server)
    return scenarios


def measure(args: argparse.Namespace, scenarios: list[Scenario], procs: harness.Procs) -> None:
    for sc in scenarios:  # warm-up: keep-alive pools filled, code paths and caches warm
        harness.run_wrk(sc.url, 64, args.warmup, sc.body, sc.token, procs, args.wrk_cores, sc.pids)
    for rep in range(args.repeat):
        for sc in scenarios:
            r64 = harness.run_wrk(sc.url, 64, args.duration, sc.body, sc.token, procs, args.wrk_cores, sc.pids)
            r1 = harness.run_wrk(sc.url, 1, args.latency_duration, sc.body, sc.token, procs, args.wrk_cores, sc.pids)
            sc.runs64.append(r64)
            sc.runs1.append(r1)
            bad = r64.non2xx + r1.non2xx + r64.socket_errors + r1.socket_errors
            print(
                f"[{rep + 1}/{args.repeat}] {sc.name:36s} {r64.rps:9.0f} req/s @64  p50 {r1.p50_ms:6.3f} ms  "
                f"p99 {r1.p99_ms:6.3f} ms @1  {r64.server_cpu_us:6.0f} µs CPU/req  "
                f"other load {max(r64.other_cpu, r1.other_cpu):.2f} cores" + (f"  ERRORS {bad}" if bad else ""),
                file=sys.stderr,
                flush=True,
            )


def summarize(scenarios: list[Scenario], args: argparse.Namespace) -> tuple[str, bool]:
    med = harness.median
    p50 = {sc.name: med([r.p50_ms for r in sc.runs1]) for sc in scenarios}
    lines = [
        "| scenario | req/s @64 | p50 @1 (ms) | p99 @1 (ms) | added p50 (ms) | server CPU/req @64 (µs) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for sc in scenarios:
        rps = [r.rps for r in sc.runs64]
        added = f"{p50[sc.name] - p50[sc.reference]:+.3f}" if sc.reference else "—"
        errors = sum(r.non2xx + r.socket_errors for r in sc.runs64 + sc.runs1)
        name = sc.name + (f" ({errors} errors)" if errors else "")
        lines.append(
            f"| {name} | {med(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) | {p50[sc.name]:.3f} | "
            f"{med([r.p99_ms for r in sc.runs1]):.3f} | {added} | {med([r.server_cpu_us for r in sc.runs64]):.0f} |"
        )
    proxy = next(sc for sc in scenarios if sc.name.startswith("proxy, LOG_LEVEL=warning"))
    added = p50[proxy.name] - p50[proxy.reference]
    rps = med([r.rps for r in proxy.runs64])
    ok = added <= TARGET_ADDED_P50_MS and rps >= TARGET_RPS_64
    other = med([max(r.other_cpu for r in sc.runs64 + sc.runs1) for sc in scenarios])
    lines += [
        "",
        f"Medians of {args.repeat} runs (req/s: median (min–max)); {args.duration:g} s at 64 connections, "
        f"{args.latency_duration:g} s at 1 connection, wrk -t1. Pinning: proxy/nginx hop on core "
        f"{args.proxy_cores or '-'}, upstream on {args.upstream_cores or '-'}, wrk on {args.wrk_cores or '-'}. "
        f"Upstream: {args.upstream}.",
        f"Background load from other processes during the runs: median {other:.2f} cores "
        f"(of {harness.NCPU}); above ~0.2 req/s and latency are noisy, CPU/req much less so. "
        "Server CPU/req: CPU time of the server process(es) (the upstream's for the direct rows) per request.",
        f"Targets (proxy, LOG_LEVEL=warning): added p50 {added:.3f} ms (≤ {TARGET_ADDED_P50_MS} ms) "
        f"{'met' if added <= TARGET_ADDED_P50_MS else 'NOT met'}; {rps:,.0f} req/s @64 (≥ {TARGET_RPS_64:,.0f}) "
        f"{'met' if rps >= TARGET_RPS_64 else 'NOT met'}.",
    ]
    return "\n".join(lines), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--duration", type=float, default=3, help="seconds of each 64-connection run (default 3)")
    parser.add_argument("--latency-duration", type=float, default=2, help="seconds of each 1-connection run")
    parser.add_argument("--warmup", type=float, default=1, help="seconds of warm-up per scenario")
    parser.add_argument("--upstream", choices=["nginx", "aiohttp"], default="nginx")
    parser.add_argument("--full-app", action="store_true", help="also the app with the Gradio page (slower start)")
    parser.add_argument("--no-stream", action="store_true", help="skip the SSE stream scenarios")
    parser.add_argument("--repo", default=str(harness.REPO), help="the tree whose proxy is measured")
    parser.add_argument(
        "--access-log", default="off", choices=["on", "off"], help="uvicorn's access line (app.py: off)"
    )
    parser.add_argument("--proxy-cores", default=harness.PROXY_CORES, help="taskset cores of the proxy ('': none)")
    parser.add_argument("--upstream-cores", default=harness.UPSTREAM_CORES, help="taskset cores of the upstream")
    parser.add_argument("--wrk-cores", default=harness.WRK_CORES, help="taskset cores of wrk")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument(
        "--priority", type=int, default=harness.PRIORITY, help=f"nice value of the servers and wrk ({harness.PRIORITY})"
    )
    args = parser.parse_args()
    harness.PRIORITY = args.priority
    if harness.NCPU < 2:
        args.proxy_cores = args.upstream_cores = args.wrk_cores = ""
    harness.need("wrk")
    harness.need("nginx")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        workdir = Path(tmp)
        procs = harness.Procs(workdir)
        try:
            scenarios = start_servers(args, procs, workdir)
            print(
                f"servers up in {time.monotonic() - started:.1f}s; " + procs.log_of("proxy").strip().splitlines()[-1],
                file=sys.stderr,
            )
            measure(args, scenarios, procs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except Exception:
            for name, _ in procs.children:
                tail = procs.log_of(name).strip()[-800:]
                if tail:
                    print(f"--- {name} log ---\n{tail}", file=sys.stderr)
            raise
        finally:
            info_lines = procs.log_of("proxy-info").count("proxy.access")
            procs.close()
    table, ok = summarize(scenarios, args)
    print(table)
    print(f"(proxy at LOG_LEVEL=info wrote {info_lines:,} access lines; total time {time.monotonic() - started:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    sc.name: {"c64": [asdict(r) for r in sc.runs64], "c1": [asdict(r) for r in sc.runs1]}
                    for sc in scenarios
                },
                indent=1,
            )
        )
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
