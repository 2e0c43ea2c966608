"""Which upstream HTTP client: the same minimal forwarding app with each client, under the same load.

    python bench/clients.py [--repeat 3]

A bare ASGI app (no framework) reads the POST body, sends it to the nginx fake upstream with
the client under test and returns the reply; uvicorn serves it (one worker, as the proxy). wrk
drives each variant at 64 connections (req/s) and 1 connection (p50). Variants: aiohttp's
ClientSession (what the proxy uses), httpx.AsyncClient with its default pool (100 connections)
and with a pool as large as the load, and httpx over the httpx-aiohttp transport (when
`httpx_aiohttp` is installed). The proxy's own figures (bench/overhead.py) sit on top of this.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import upstream  # noqa: E402

VARIANTS = ["aiohttp", "httpx (default pool)", "httpx (pool 512)", "httpx + httpx-aiohttp transport"]


def make_app(variant: str, url: str):  # noqa: ANN201 - an ASGI callable
    """The minimal forwarding app for one client variant."""
    state: dict = {}

    async def startup() -> None:
        if variant == "aiohttp":
            import aiohttp

            state["client"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512), trust_env=False)
        elif variant.startswith("httpx + httpx-aiohttp"):
            import httpx
            from httpx_aiohttp import HttpxAiohttpClient

            state["client"] = HttpxAiohttpClient(limits=httpx.Limits(max_connections=512), trust_env=False)
        else:
            import httpx

            limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
            state["client"] = httpx.AsyncClient(trust_env=False, **({"limits": limits} if "512" in variant else {}))

    async def forward(body: bytes) -> tuple[int, bytes]:
        client = state["client"]
        headers = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
        if variant == "aiohttp":
            async with client.post(url, data=body, headers=headers) as resp:
                return resp.status, await resp.read()
        resp = await client.post(url, content=body, headers=headers)
        return resp.status_code, resp.content

    async def app(scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await startup()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["client"].close() if variant == "aiohttp" else await state["client"].aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, reply = await forward(b"".join(chunks))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    return app


def serve(variant: str, fd: int, url: str) -> None:
    import uvicorn

    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(make_app(variant, url), log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--latency-duration", type=float, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.fd, args.url)
        return 0
    harness.need("wrk")
    harness.need("nginx")
    variants = list(VARIANTS)
    try:
        import httpx_aiohttp  # noqa: F401
    except ImportError:
        variants.remove("httpx + httpx-aiohttp transport")
        print("httpx_aiohttp is not installed (pip install httpx-aiohttp): that variant is skipped", file=sys.stderr)

    runs: dict[str, list[tuple[harness.WrkResult, harness.WrkResult]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="proxy-clients-") as tmp:
        workdir = Path(tmp)
        procs = harness.Procs(workdir)
        try:
            up_port, stream_port = harness.free_port(), harness.free_port()
            conf = workdir / "upstream.conf"
            conf.write_text(upstream.nginx_upstream_conf(workdir, up_port, stream_port))
            procs.start("upstream", [*harness.pin(None), "nginx", "-p", str(workdir), "-c", str(conf)])
            target = f"http://127.0.0.1:{up_port}/v1/chat/completions"
            urls, pids = {}, {}
            for i, variant in enumerate(variants):
                sock = harness.listening_socket()
                proc = procs.start(
                    f"app{i}",
                    [*harness.pin(None), sys.executable, __file__, "--serve", variant, "--fd", str(sock.fileno()),
                     "--url", target],
                    pass_fds=[sock.fileno()],
                )  # fmt: skip
                urls[variant] = f"http://127.0.0.1:{sock.getsockname()[1]}/"
                sock.close()
                pids[variant] = [proc.pid]
                harness.wait_http(target, proc=procs.children[0][1])
                harness.wait_http(urls[variant], timeout=30, proc=proc)
            for variant, url in urls.items():
                status, body = harness.post(url, harness.REQUEST)
                if status != 200 or b"chat.completion" not in body:
                    raise RuntimeError(f"{variant}: {status} {body[:200]!r}")
                harness.run_wrk(url, 64, 1, harness.REQUEST, None, procs, None, pids[variant])
            for rep in range(args.repeat):
                for variant, url in urls.items():
                    r64 = harness.run_wrk(url, 64, args.duration, harness.REQUEST, None, procs, None, pids[variant])
                    r1 = harness.run_wrk(url, 1, args.latency_duration, harness.REQUEST, None, procs, None)
                    runs[variant].append((r64, r1))
                    print(
                        f"[{rep + 1}/{args.repeat}] {variant:34s} {r64.rps:6.0f} req/s  {r64.server_cpu_us:4.0f} µs/req"
                        f"  p50 {r1.p50_ms:.3f} ms  other load {r64.other_cpu:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
        except KeyboardInterrupt:
            return 130
        finally:
            procs.close()
    med = harness.median
    print(f"Minimal forwarding app (bare ASGI on uvicorn), medians of {args.repeat} runs")
    print("| client | req/s @64 | CPU/req @64 (µs) | p50 @1 (ms) |")
    print("|---|---:|---:|---:|")
    for variant, rs in runs.items():
        print(
            f"| {variant} | {med([a.rps for a, _ in rs]):,.0f} | {med([a.server_cpu_us for a, _ in rs]):.0f} | "
            f"{med([b.p50_ms for _, b in rs]):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
